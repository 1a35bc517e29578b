"""The README's examples run (on the CPU here, the reference backend serving), and its tables name
exactly the backends and environment variables the library has."""

import re
from pathlib import Path

import grouped
from grouped.backends import BACKENDS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_python_examples_run():
    blocks = _python_blocks()
    assert blocks, "the README has no python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def _table_first_column(header: str) -> list[str]:
    table = README[README.index(header):].split("\n\n")[0]
    rows = [line for line in table.splitlines()[2:] if line.startswith("|")]
    return [row.split("|")[1].strip().strip("`") for row in rows]


def test_backend_table_lists_every_backend():
    assert _table_first_column("| backend ") == list(BACKENDS)


def test_environment_table_lists_every_variable():
    assert _table_first_column("| variable ") == list(grouped.env.ENV_VARS)
