"""`dlngraph doctor`: what this machine offers dlngraph, and what is missing.

Reports names only for credentials: a provider counts as configured when its
environment variable is set; the value is never read into the output.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import typer

# litellm's environment variable per provider (names from litellm's provider docs).
PROVIDER_ENV = {
    "anthropic": "ANTHROPIC_API_KEY",
    "azure": "AZURE_API_KEY",
    "bedrock": "AWS_ACCESS_KEY_ID",
    "cohere": "COHERE_API_KEY",
    "deepseek": "DEEPSEEK_API_KEY",
    "fireworks_ai": "FIREWORKS_AI_API_KEY",
    "gemini": "GEMINI_API_KEY",
    "groq": "GROQ_API_KEY",
    "huggingface": "HUGGINGFACE_API_KEY",
    "mistral": "MISTRAL_API_KEY",
    "ollama": "OLLAMA_API_BASE",
    "openai": "OPENAI_API_KEY",
    "openai-compatible server": "OPENAI_API_BASE",
    "openrouter": "OPENROUTER_API_KEY",
    "together_ai": "TOGETHERAI_API_KEY",
    "vertex_ai": "VERTEXAI_PROJECT",
    "xai": "XAI_API_KEY",
}


@dataclass(frozen=True)
class Check:
    section: str
    name: str
    value: str
    status: str  # ok | fail | info
    hint: str = ""


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _system() -> list[Check]:
    from dlngraph import __version__

    checks = [
        Check("system", "dlngraph", __version__, "info"),
        Check("system", "python", platform.python_version(), "ok" if sys.version_info >= (3, 11) else "fail"),
        Check("system", "platform", platform.platform(), "info"),
    ]
    for dist, extra in (("transformers", None), ("litellm", None), ("mlflow", "mlflow"), ("mkdocs-material", "docs")):
        version = _version(dist)
        if version:
            checks.append(Check("system", dist, version, "ok"))
        elif extra:  # optional: only what needs it is missing
            checks.append(Check("system", dist, "not installed", "info", f'pip install "dlngraph[{extra}]"'))
        else:
            checks.append(Check("system", dist, "not installed", "fail", f"pip install {dist}"))
    return checks


def _torch() -> list[Check]:
    try:
        import torch
    except ImportError:
        return [Check("torch", "torch", "not installed", "fail", 'pip install "torch==2.13.0"')]
    cuda = torch.cuda.is_available()
    checks = [
        Check("torch", "torch", torch.__version__, "ok"),
        Check("torch", "CUDA", f"yes (CUDA {torch.version.cuda})" if cuda else "no", "ok" if cuda else "info"),
        Check("torch", "device (auto)", "cuda" if cuda else "cpu", "info"),
    ]
    if cuda:
        checks.append(Check("torch", "GPU", torch.cuda.get_device_name(0), "info"))
    return checks


def _model_and_cache() -> list[Check]:
    from dlngraph.errors import RuntimeFailure
    from dlngraph.runtime.models import EMBEDDED, ModelSource, cache_root, converted_dir, embedded_gguf_path

    root = cache_root()
    checks = []
    try:
        gguf = embedded_gguf_path()
        checks.append(Check("model", "embedded model", f"{gguf} ({_human(_size(gguf))})", "ok"))
        converted = converted_dir(ModelSource.resolve(EMBEDDED))
        ready = (converted / "config.json").is_file()
        checks.append(
            Check(
                "model", "converted weights", str(converted) if ready else "not yet converted",
                "ok" if ready else "info", "" if ready else "the first model load converts it (~15 s, once)",
            )
        )
    except RuntimeFailure as exc:
        checks.append(Check("model", "embedded model", "missing", "fail", exc.hint or str(exc)))
    override = " (from DLNGRAPH_CACHE_DIR)" if os.environ.get("DLNGRAPH_CACHE_DIR") else ""
    checks.append(Check("cache", "location", f"{root}{override}", "info"))
    checks.append(Check("cache", "total size", _human(_size(root)), "info"))
    responses = root / "cache.sqlite"
    checks.append(
        Check("cache", "response cache", f"{_human(_size(responses))}" if responses.exists() else "empty", "info")
    )
    return checks


def _providers() -> list[Check]:
    configured = sorted(f"{p} ({v})" for p, v in PROVIDER_ENV.items() if os.environ.get(v))
    return [
        Check(
            "providers", "litellm providers", ", ".join(configured) or "none configured", "info",
            "" if configured else "the embedded model needs none; set e.g. OPENAI_API_KEY for a hosted model",
        )
    ]


def diagnose() -> list[Check]:
    return _system() + _torch() + _model_and_cache() + _providers()


def doctor_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON."),
) -> None:
    """Report the environment: python, torch and its device, the embedded model, the cache, providers.

    Exits with 1 when something dlngraph needs is missing. Credentials are reported by
    environment variable name only.

    Examples:

      dlngraph doctor

      dlngraph doctor --json
    """
    checks = diagnose()
    if as_json:
        typer.echo(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        marks = {"ok": "[green]ok[/]", "fail": "[red]FAIL[/]", "info": ""}
        table = Table(show_header=False, box=None, pad_edge=False)
        for _ in range(4):
            table.add_column(overflow="fold")  # wrap long paths, never cut them
        for c in checks:
            hint = f" [dim]({escape(c.hint)})[/]" if c.hint else ""
            table.add_row(f"[bold]{c.section}[/]", escape(c.name), f"{escape(c.value)}{hint}", marks[c.status])
        Console(highlight=False).print(table)
    if any(c.status == "fail" for c in checks):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor_cmd)
