"""The README's promises that code can check: the two commands, the config reference, CI."""

import re
from pathlib import Path

from kubetune.config_reference import reference_markdown

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_readme_opens_with_the_two_commands():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:.*\n\t\$\(BIN\)/kubetune run$", makefile, re.M)
    assert re.search(r"^test: venv", makefile, re.M)


def test_config_reference_is_current():
    table = README.split("<!-- config-reference:start -->\n")[1].split("\n<!-- config-reference:end -->")[0]
    assert table == reference_markdown(), "README config table is stale: paste `kubetune config --markdown`"


def test_ci_runs_the_readme_test_command():
    assert re.search(r"^step test make test", (ROOT / ".ci" / "run").read_text(), re.M)
