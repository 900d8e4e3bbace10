"""Compile time of layered DAG specs of 500, 5,000 and 50,000 nodes.

Each spec has `width` nodes per layer; a node reads two nodes of the layer
before it (the first layer reads the dataset input), and the last layer's
nodes are the outputs, so every node reaches one. Templates differ per node,
so the template cache does not hide the parsing cost. Prints compile time,
nodes/second and time(50k)/time(5k); targets: 5k nodes < 2 s, ratio < 15.

    python benchmarks/compile_scale.py [--sizes 500 5000 50000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from dlngraph.api import compile_spec

SHAPES = {500: (10, 50), 5_000: (50, 100), 50_000: (100, 500)}  # nodes -> (layers, width)


def layered_spec(layers: int, width: int) -> str:
    lines = [f"name: layered-{layers}x{width}", "inputs: [input]", "nodes:"]
    for layer in range(layers):
        last = layer == layers - 1
        for i in range(width):
            if layer == 0:
                reads = "{{ input }}"
            else:
                reads = f"{{{{ n{layer - 1}_{i} }}}} {{{{ n{layer - 1}_{(i + 1) % width} }}}}"
            output = "{type: choice, choices: [negative, positive]}" if last else "{type: text, max_tokens: 16}"
            lines += [
                f"  n{layer}_{i}:",
                f'    template: "{{{{ prompt }}}} step {layer}.{i}: {reads}"',
                f"    output: {output}",
            ]
    lines.append("outputs:")
    lines += [f"  n{layers - 1}_{i}: target" for i in range(width)]
    return "\n".join(lines) + "\n"


def measure(nodes: int, repeat: int, directory: Path) -> tuple[float, float]:
    """(best wall-clock seconds, CPU seconds of that run) of compiling a `nodes`-node spec."""
    layers, width = SHAPES[nodes]
    path = directory / f"layered-{nodes}.yaml"
    path.write_text(layered_spec(layers, width))
    best = (float("inf"), float("inf"))
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        plan = compile_spec(path)
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    assert len(plan.nodes) == nodes and len(plan.forward) == layers
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=sorted(SHAPES), choices=sorted(SHAPES))
    parser.add_argument("--repeat", type=int, default=3, help="best of N runs (50k runs once)")
    args = parser.parse_args()
    times: dict[int, float] = {}
    cpu: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for nodes in args.sizes:
            times[nodes], cpu[nodes] = measure(nodes, 1 if nodes >= 50_000 else args.repeat, Path(tmp))
            print(
                f"{nodes:>7,} nodes: {times[nodes]:8.3f} s  {nodes / times[nodes]:>10,.0f} nodes/s"
                f"  (CPU {cpu[nodes]:.3f} s)",
                flush=True,
            )
    if 5_000 in times and 50_000 in times:
        ratio = times[50_000] / times[5_000]
        print(
            f"time(50k)/time(5k) = {ratio:.1f}  (CPU time ratio {cpu[50_000] / cpu[5_000]:.1f}; "
            "linear would be 10; target < 15)"
        )
    if 5_000 in times:
        print(f"5k nodes in {times[5_000]:.3f} s (target < 2 s): {'ok' if times[5_000] < 2 else 'TOO SLOW'}")


if __name__ == "__main__":
    main()
