"""What a new user runs first: the README's first snippet and the fine-tuning example's errors."""

import ast
import builtins
import re
import sys

import pytest

from helpers import REPO_ROOT as ROOT

sys.path.insert(0, str(ROOT / "examples"))
import finetune  # noqa: E402  (examples/ is not a package)


def names_used_before_they_are_defined(source: str) -> list[str]:
    """Names a snippet reads that no earlier statement of it assigns or imports (builtins aside)."""
    defined, missing = set(dir(builtins)), []
    for statement in ast.parse(source).body:
        for node in ast.walk(statement):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in defined:
                missing.append(node.id)
        for node in ast.walk(statement):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined.add(node.id)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                defined.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return missing


def test_the_readmes_first_snippet_defines_every_name_it_uses():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first_snippet = re.search(r"```python\n(.*?)```", readme, flags=re.DOTALL).group(1)
    assert "generate(input_ids" in first_snippet
    assert names_used_before_they_are_defined(first_snippet) == []


def test_the_readme_starts_with_the_two_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    header = re.search(r"```bash\n(.*?)```", readme, flags=re.DOTALL).group(1).splitlines()
    assert [line.split()[:2] for line in header] == [["make", "demo"], ["make", "test"]]


@pytest.mark.parametrize("packing", [False, True])
def test_a_data_file_too_short_for_two_blocks_names_the_file_and_the_seq_len(tmp_path, packing):
    data = tmp_path / "tiny.txt"
    data.write_text("a document far shorter than one block\n")
    args = ["--data", str(data), "--seq-len", "64", "--output-dir", str(tmp_path / "out")]
    rule = "document\\(s\\)" if packing else "block\\(s\\) of --seq-len 64 tokens"
    with pytest.raises(ValueError, match=f"{re.escape(str(data))} gives {0 if not packing else 1} {rule}"):
        finetune.main(args + (["--packing"] if packing else []))
