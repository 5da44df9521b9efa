"""Every code block of README.md runs as written, against a live `glmv serve` (the embedded demo model).

Blocks are taken from the README's fenced code blocks. An HTML comment on the line before a
block says how it is checked:

- `<!-- readme-test: expect: REGEX -->`: the block runs (bash with `bash -e`, python with the
  test's interpreter) in a folder laid out like a fresh clone after `make` (`.venv/bin/glmv`,
  `.venv/bin/python`, `.venv/bin/pip`, `examples/`, `benchmarks/`); it must exit 0 and its
  standard output must match REGEX. `http://127.0.0.1:8000` is the live server's address.
- `<!-- readme-test: toml-config -->`: the block is a `glmv serve --config` file and must load.
- `<!-- readme-test: skip: REASON -->`: the block cannot run here (Docker, GPU, downloads). Its
  checkout paths must exist and its `.venv/bin/glmv` command lines must parse; the deployment
  files it uses are tested in tests/docker/.

A block without a marker fails the test, so every example is checked one way or another.
`.venv/bin/pip install` runs with `--no-index` (no network; the test tools already hold what
the README installs).
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import GlmvServeProcess

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
README_URL = "http://127.0.0.1:8000"
MARKER = re.compile(r"^<!-- readme-test: (?P<kind>skip|expect|toml-config)(?::\s*(?P<arg>.*?))?\s*-->$")
# Programs a fresh clone's venv has after `make` or that the README installs into it.
VENV_PROGRAMS = {"glmv", "python", "pip", "hf", "modelscope", "locust", "jupyter"}


@dataclass(frozen=True, slots=True)
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    kind: str | None  # skip / expect / toml-config, None without a marker
    arg: str | None

    @property
    def id(self) -> str:
        return f"L{self.line}-{self.lang or 'text'}"


def readme_blocks(text: str) -> list[Block]:
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if fence is None:
            i += 1
            continue
        indent, lang = fence.group(1), fence.group(2)
        marker = MARKER.match(lines[i - 1].strip()) if i > 0 else None
        body: list[str] = []
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        blocks.append(
            Block(
                line=i + 1,
                lang=lang,
                code="\n".join(body) + "\n",
                kind=marker.group("kind") if marker else None,
                arg=marker.group("arg") if marker else None,
            )
        )
        i = j + 1
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


# --- a fresh-clone-like folder -------------------------------------------------------------------------


def make_clone(root: Path) -> Path:
    """`root` laid out like a checkout after `make`: venv programs (shims onto this interpreter)
    and the checkout folders the README uses."""
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    py = shlex.quote(sys.executable)
    shims = {
        "python": f'exec {py} "$@"',
        "glmv": f'exec {py} -m glmv "$@"',
        "pip": f'if [ "$1" = install ]; then shift; exec {py} -m pip install --no-index "$@"; fi\nexec {py} -m pip "$@"',
    }
    for name, body in shims.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    for folder in ("examples", "benchmarks", "docker"):
        (root / folder).symlink_to(REPO / folder)
    (root / "pyproject.toml").symlink_to(REPO / "pyproject.toml")
    (root / "glmv").symlink_to(REPO / "glmv")
    return root


def block_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GLMV_", "OPENAI_", "PIP_"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["GLMV_CACHE_DIR"] = str(root / "cache")  # the embedded tiny model of `glmv chat` and `LLM`
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def run_block(block: Block, root: Path, base_url: str) -> str | None:
    """Run a runnable block in `root`; None when it passed, else what went wrong."""
    code = block.code.replace(README_URL, base_url)
    if block.lang == "bash":
        cmd = ["bash", "-e", "-c", code]
    elif block.lang == "python":
        cmd = [sys.executable, "-c", code]
    else:
        return f"cannot run a `{block.lang}` block: mark it skip"
    try:
        done = subprocess.run(
            cmd, cwd=root, env=block_env(root), capture_output=True, text=True, errors="replace", timeout=300
        )
    except subprocess.TimeoutExpired:
        return "did not finish within 300 s"
    report = f"exit {done.returncode}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
    if done.returncode != 0:
        return report
    if re.search(r'"error":\s*\{', done.stdout):
        return "the server answered with an error\n" + report
    if block.kind == "expect" and not re.search(block.arg or "", done.stdout):
        return f"stdout does not match {block.arg!r}\n" + report
    return None


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield make_clone(tmp_path_factory.mktemp("readme-clone"))


# --- the README as a whole -------------------------------------------------------------------------


def test_every_block_says_how_it_is_checked() -> None:
    assert len(BLOCKS) >= 15
    unmarked = [b.id for b in BLOCKS if b.kind is None]
    assert unmarked == [], f"README blocks without a `<!-- readme-test: ... -->` marker: {unmarked}"
    for b in BLOCKS:
        if b.kind == "skip":
            assert b.arg, f"{b.id}: a skipped block says why"
        if b.kind == "expect":
            re.compile(b.arg or "")


def test_commands_use_the_venv_programs() -> None:
    for b in BLOCKS:
        if b.lang != "bash":
            continue
        for raw in b.code.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            for prog in re.findall(r"(?:^|[;&|]\s*|\$\()([\w./-]+)", line):
                name = prog.rsplit("/", 1)[-1]
                if name in VENV_PROGRAMS and name != "python":
                    assert prog == f".venv/bin/{name}", f"{b.id}: `{prog}` should be `.venv/bin/{name}`"
            for venv_prog in re.findall(r"\.venv/bin/([\w-]+)", line):
                assert venv_prog in VENV_PROGRAMS, (
                    f"{b.id}: .venv/bin/{venv_prog} is not something the README installs"
                )
    text = README.read_text(encoding="utf-8")
    assert (
        "pip install 'glmv" not in text and 'pip install "glmv' not in text
    )  # glmv is not on a package index


def test_paths_the_readme_names_exist() -> None:
    text = README.read_text(encoding="utf-8")
    created = {m.group(1) for b in BLOCKS for m in re.finditer(r"^cp \S+ (\S+)", b.code, re.MULTILINE)}
    for path in sorted(
        set(re.findall(r"\b((?:docker|benchmarks|examples|tests)/[\w./-]*\w)", text)) - created
    ):
        assert (REPO / path).exists(), f"README names {path}, which is not in the checkout"


def test_glmv_command_lines_in_every_block_parse() -> None:
    """Also the skipped blocks' `glmv` commands and `make serve ARGS=...`: their flags exist."""
    from glmv.cli import build_parser

    parser = build_parser()
    checked = 0
    for b in BLOCKS:
        if b.lang != "bash":
            continue
        code = b.code.replace("\\\n", " ")
        for line in code.splitlines():
            line = line.split(" #", 1)[0].strip()
            argv: list[str] | None = None
            if line.startswith(".venv/bin/glmv "):
                argv = shlex.split(line)[1:]
            elif line.startswith("make serve ARGS="):
                argv = ["serve", *shlex.split(shlex.split(line)[2].removeprefix("ARGS="))]
            if argv is None:
                continue
            try:
                parser.parse_args(argv)
            except SystemExit as exc:
                pytest.fail(f"{b.id}: `{line}` does not parse (exit {exc.code})")
            checked += 1
    assert checked >= 4


def test_locust_example_matches_the_locustfile() -> None:
    [block] = [b for b in BLOCKS if "locust -f" in b.code]
    path = REPO / re.search(r"-f (\S+)", block.code).group(1)  # type: ignore[union-attr]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    users = [
        n.name
        for n in tree.body
        if isinstance(n, ast.ClassDef) and any(getattr(base, "id", None) == "HttpUser" for base in n.bases)
    ]
    assert users, "the locustfile defines an HttpUser"
    assert "--host http://127.0.0.1:8000" in block.code


# --- the runnable blocks ---------------------------------------------------------------------------


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind == "expect"], ids=lambda b: b.id)
def test_readme_block_runs(block: Block, clone: Path, live_glmv: GlmvServeProcess) -> None:
    problem = run_block(block, clone, live_glmv.url)
    assert problem is None, f"README block at line {block.line} failed:\n{block.code}\n{problem}"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind == "toml-config"], ids=lambda b: b.id)
def test_readme_config_file_loads(block: Block, tmp_path: Path) -> None:
    from glmv.server.settings import Settings

    path = tmp_path / "glmv.toml"
    path.write_text(block.code)
    settings = Settings.from_sources({}, {}, path)
    assert settings.config == str(path)


def test_a_broken_example_fails(clone: Path, live_glmv: GlmvServeProcess) -> None:
    """The checks catch what the README once had wrong: a model name the server does not serve,
    and Python that does not run."""
    [curl] = [
        b for b in BLOCKS if b.lang == "bash" and "/v1/chat/completions" in b.code and b.kind == "expect"
    ]
    wrong_model = Block(
        curl.line, curl.lang, curl.code.replace('"glmv-demo"', '"default"'), curl.kind, curl.arg
    )
    assert wrong_model.code != curl.code
    problem = run_block(wrong_model, clone, live_glmv.url)
    assert problem is not None and "model_not_found" in problem
    [ask] = [
        b
        for b in BLOCKS
        if b.lang == "python" and "reasoning_content" in b.code and "stream=True" not in b.code
    ]
    typo = Block(
        ask.line, ask.lang, ask.code.replace("message.content", "message.contents"), ask.kind, ask.arg
    )
    problem = run_block(typo, clone, live_glmv.url)
    assert problem is not None and "AttributeError" in problem
