"""The README's promises that code can check: the two commands, a short front page whose links all
resolve, the config reference in docs/configuration.md, CI."""

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
    reference = (ROOT / "docs" / "configuration.md").read_text()
    table = reference.split("<!-- config-reference:start -->\n")[1].split("\n<!-- config-reference:end -->")[0]
    assert table == reference_markdown(), "docs/configuration.md is stale: run `make readme-config`"


def test_the_front_page_is_short_and_every_link_resolves():
    assert len(README.splitlines()) <= 150, "README.md is the front page: move detail to docs/"
    for document in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", document.read_text()):
            assert (document.parent / target).is_file(), f"{document.name} links to {target}, which is not there"
    linked = set(re.findall(r"\(docs/([\w.-]+\.md)\)", README))
    assert linked == {path.name for path in (ROOT / "docs").glob("*.md")}, "the front page lists every document"


def test_ci_runs_the_readme_test_command():
    assert re.search(r"^step test make test", (ROOT / ".ci" / "run").read_text(), re.M)
