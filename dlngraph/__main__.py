from dlngraph.cli import main

main()
