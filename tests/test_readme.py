"""README.md's commands, run as pasted: every shell command of its bash and console blocks and every
Python block, in order, in a copy of the repository with a fresh virtual environment installed as the
README says, from a shell that has no `kgpt` and no network. The README is the source: nothing here
copies its commands. The test adds only tiny training settings (`TINY_TRAINING`, `RECIPE_SETTINGS`),
small corpora in the Keras cache where downloads would land, and offline `pip` settings; it skips
only the commands of `SKIPPED`, each with its reason.
"""

import dataclasses
import functools
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import textwrap
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = ("README.md", "pipelines/README.md")  # and docs/*.md, found at run time
SHELL_LANGUAGES = ("bash", "sh", "shell", "console")

# Commands that cannot run offline or on one machine by nature: pattern (re.search) -> reason.
SKIPPED = {
    r"&& \.venv/bin/pytest$": "the whole test suite: .ci/run runs this set-up command itself",
    r"^docker run ": "TensorFlow Serving's docker image: needs docker and the network",
    r"^export TF_CONFIG=": "multi-worker training: needs several machines",
    r"train\.strategy=multiworker": "multi-worker training: needs several machines",
    r"^\.venv/bin/hf download ": "downloads GPT-2 from the Hugging Face Hub: needs the network",
    r"import-gpt2 hf/gpt2|checkpoints/gpt2\b|wikitext2_gpt2\.toml": "needs the GPT-2 download",
}
# Appended to every `kgpt train` and `kgpt baseline`: a few steps, no XLA (compiling costs more
# than two steps), no samples (their decode loop compiles: 3 s a run; tests/test_train.py has them).
# max_steps stays a multiple of eval_interval.
TINY_TRAINING = ("--set train.max_steps=2 --set train.eval_interval=2 --set train.eval_steps=1 "
                 "--set train.warmup_steps=1 --set train.steps_per_execution=1 "
                 "--set train.jit_compile=false --set train.sample_prompt=")
SMALL_MODEL = "--set model.num_layers=1 --set model.num_heads=2 --set model.hidden_dim=16"
SMALL_BPE = "--set data.vocabulary_size=300 --set data.sequence_length=16 --set train.batch_size=2"
# Settings per recipe on top of TINY_TRAINING; a recipe missing here fails the test. tiny.toml keeps
# its sizes: the README fine-tunes checkpoints/tiny with them.
RECIPE_SETTINGS = {
    "pipelines/tiny.toml": "",
    "pipelines/shakespeare_char.toml": f"{SMALL_MODEL} --set train.eval_batch_size=8",
    "pipelines/imdb.toml": f"{SMALL_MODEL} {SMALL_BPE} --set data.validation_count=2",
    "pipelines/wikitext2.toml": f"{SMALL_MODEL} {SMALL_BPE}",
    "pipelines/wikitext2_gru.toml": f"{SMALL_MODEL} {SMALL_BPE}",
}
# Commands whose printed output does not depend on the trained weights: checked against the README.
OUTPUT_CHECKED = (".venv/bin/kgpt export ", ".venv/bin/kgpt serve ")
README_ROOT = "/home/me/kgpt"  # where the README's sample outputs say the repository is


@dataclasses.dataclass
class Command:
    text: str  # as in the document, continuation lines joined as the shell joins them
    language: str  # a shell language, or "python"
    where: str  # document:line
    output: list = dataclasses.field(default_factory=list)  # console blocks: the lines shown after it


def _complete(text):
    """True when `text` is a whole shell command (no open quote, no trailing backslash)."""
    try:
        shlex.split(text, comments=True)
    except ValueError:
        return False
    return not text.rstrip().endswith("\\")


def _fenced_blocks(text):
    """Yields (language, first line number, lines) of each fenced code block."""
    lines, index = text.splitlines(), 0
    while index < len(lines):
        match = re.match(r"^```(\S*)\s*$", lines[index])
        index += 1
        if not match:
            continue
        start, body = index, []
        while index < len(lines) and not lines[index].startswith("```"):
            body.append(lines[index])
            index += 1
        index += 1
        yield match.group(1), start + 1, body


def document_commands(path, name):
    """The commands of the document at `path`, in order (see `Command`)."""
    with open(path, encoding="utf-8") as file:
        text = file.read()
    commands = []
    for language, first, body in _fenced_blocks(text):
        where = functools.partial("{}:{}".format, name)
        if language == "python":
            commands.append(Command("\n".join(body), "python", where(first)))
        elif language in SHELL_LANGUAGES:
            prompted = language == "console"
            current = None
            for offset, line in enumerate(body):
                if current is not None and not _complete(current.text):
                    current.text += "\n" + line
                elif not prompted or line.startswith("$ "):
                    line = line[2:] if prompted else line
                    if line.strip() and not line.lstrip().startswith("#"):
                        current = Command(line, language, where(first + offset))
                        commands.append(current)
                elif current is not None:
                    current.output.append(line)
        else:  # output, layouts, synopses: no command may hide in them
            for offset, line in enumerate(body):
                assert not re.match(r"^(\$ |\.venv/bin/|python3? )", line), (
                    f"{where(first + offset)}: a command in a ```{language} block; fence it as ```bash or ```console")
    return commands


def all_commands():
    names = list(DOCUMENTS) + sorted(
        f"docs/{n}" for n in os.listdir(os.path.join(ROOT, "docs")) if n.endswith(".md"))
    return [c for name in names for c in document_commands(os.path.join(ROOT, name), name)]


def _outside_quotes(text, token):
    """Indices where `token` starts outside quotes in a shell command."""
    found, quote, index = [], None, 0
    while index < len(text):
        char = text[index]
        if char == "\\" and quote != "'":
            index += 2
            continue
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif text.startswith(token, index):
            found.append(index)
        index += 1
    return found


def _without_comment(text):
    """`text` without a trailing shell comment."""
    for index in _outside_quotes(text, "#"):
        if index == 0 or text[index - 1].isspace():
            return text[:index].rstrip()
    return text


def with_tiny_settings(text):
    """`text` with the tiny settings appended to each `kgpt train` / `kgpt baseline` of it."""
    cuts = [0, *(i + 2 for i in _outside_quotes(text, "&&")), len(text) + 2]
    parts = [text[a:b - 2] for a, b in zip(cuts, cuts[1:])]
    changed = []
    for part in parts:
        part = _without_comment(part.strip())
        words = shlex.split(part)
        if words[:2] in ([".venv/bin/kgpt", "train"], [".venv/bin/kgpt", "baseline"]):
            recipe = next(w for w in words[2:] if w.endswith(".toml"))
            assert recipe in RECIPE_SETTINGS, (
                f"{recipe}: no tiny settings for it; add them to RECIPE_SETTINGS in tests/test_readme.py")
            part = " ".join(filter(None, [part, TINY_TRAINING, RECIPE_SETTINGS[recipe]]))
        changed.append(part)
    return " && ".join(changed)


def skip_reason(command):
    for pattern, reason in SKIPPED.items():
        if re.search(pattern, command.text):
            return reason
    return None


# --- the sandbox: a copy, a venv over this interpreter's packages, small corpora, no network ------


def _words(rng, count):
    vocabulary = "the a cat dog sat ran on mat film was good bad plot actor we sing la time old".split()
    return " ".join(rng.choice(vocabulary, size=count))


def write_corpora(keras_datasets):
    """Small corpora where kgpt's downloads land (the Keras cache), in their archives' layout."""
    rng = np.random.default_rng(0)
    wikitext = os.path.join(keras_datasets, "wikitext-2-raw")
    os.makedirs(wikitext)
    for split, articles in (("train", 12), ("valid", 3), ("test", 3)):
        text = "".join(f" \n = Article {split} {a} = \n \n {_words(rng, 60)} . \n {_words(rng, 40)} . \n"
                       for a in range(articles))
        with open(os.path.join(wikitext, f"wiki.{split}.raw"), "w", encoding="utf-8") as file:
            file.write(text)
    for split, count in (("train", 8), ("test", 5)):
        for polarity in ("pos", "neg"):
            folder = os.path.join(keras_datasets, "aclImdb", split, polarity)
            os.makedirs(folder)
            for i in range(count):
                with open(os.path.join(folder, f"{i}_7.txt"), "w", encoding="utf-8") as file:
                    file.write(f"{_words(rng, 50)}.<br /><br />{_words(rng, 30)}.")


def make_sandbox(tmp_path):
    """`(repository copy, environment)`: the working tree's files (tracked and untracked, not
    ignored), a `.venv` whose site-packages reach this interpreter's packages, and the environment of
    a new shell: no `kgpt` on PATH, HOME in tmp_path, pip offline, any download refused."""
    try:
        listed = subprocess.run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others",
                                 "--exclude-standard"], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs git and a git checkout (the copy is the working tree's files)")
    repository = tmp_path / "kgpt"
    for name in filter(None, listed.decode().split("\0")):
        source = os.path.join(ROOT, name)
        if os.path.isfile(source):
            os.makedirs(repository / os.path.dirname(name), exist_ok=True)
            shutil.copy2(source, repository / name)
    # `python3` is this interpreter's base Python, so the venv can reuse its packages (a .pth file).
    shims = tmp_path / "bin"
    shims.mkdir()
    os.symlink(getattr(sys, "_base_executable", sys.executable), shims / "python3")
    subprocess.run([str(shims / "python3"), "-m", "venv", str(repository / ".venv")], check=True)
    inner = subprocess.run([str(repository / ".venv/bin/python"), "-c",
                            "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           capture_output=True, text=True, check=True).stdout.strip()
    outer = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    with open(os.path.join(inner, "zz_outer_packages.pth"), "w") as file:
        file.write("\n".join(outer) + "\n")  # plain paths: their .pth files (an editable kgpt) stay off
    home = tmp_path / "home"
    write_corpora(str(home / ".keras" / "datasets" / "kgpt"))
    refused = "http://127.0.0.1:9"  # nothing listens there: a download fails at once
    environment = {
        "PATH": f"{shims}:/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
        # The README's pip commands, offline: no index, no dependencies (this interpreter's packages
        # are there), no build isolation (pip reads the variable as `build_isolation`, hence 0).
        "PIP_NO_INDEX": "1", "PIP_NO_DEPS": "1", "PIP_NO_BUILD_ISOLATION": "0",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "http_proxy": refused, "https_proxy": refused, "HTTP_PROXY": refused, "HTTPS_PROXY": refused,
        "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost",
    }
    for name in ("KGPT_XLA_CACHE", "TMPDIR", "CUDA_VISIBLE_DEVICES"):  # the session's XLA cache (conftest)
        if name in os.environ:
            environment[name] = os.environ[name]
    assert shutil.which("kgpt", path=environment["PATH"]) is None, "a kgpt on the new shell's PATH"
    return repository, environment


def _port(command):
    match = re.search(r"--port (\d+)", command)
    return int(match.group(1)) if match else 8501


def _port_free(port):
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def start_server(command, repository, environment, log_folder):
    """Starts a `kgpt serve` command in the background; returns (process, banner lines)."""
    port = _port(command.text)
    assert _port_free(port), f"{command.where}: port {port} is in use; the README's server needs it"
    out = open(log_folder / f"serve-{port}.out", "w+")
    process = subprocess.Popen(["bash", "-c", command.text], cwd=repository, env=environment,
                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        out.seek(0)
        printed = out.read()
        if "kgpt serve:" in printed and not _port_free(port):
            lines = printed[printed.index("kgpt serve:"):].splitlines()
            return process, lines
        if process.poll() is not None:
            break
        time.sleep(0.5)
    out.seek(0)
    stop_server(process)
    pytest.fail(f"{command.where}: `{command.text}` did not start serving:\n{out.read()[-3000:]}")


def stop_server(process):
    if process.poll() is None:
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


def check_output(command, printed, repository):
    """For `OUTPUT_CHECKED` commands: the README's lines are the ones printed (this machine's path
    of the repository written as the README's). A request (`curl`) answers an error exactly where
    the README shows one."""
    if command.text.startswith("curl "):
        shown, answered = ('"error"' in "\n".join(lines) for lines in (command.output, printed))
        assert answered == shown, f"{command.where}: `{command.text}` answered\n" + "\n".join(printed)
    if not command.output or not command.text.startswith(OUTPUT_CHECKED):
        return
    printed = [line.replace(str(repository), README_ROOT) for line in printed]
    expected = [line for line in command.output if line.strip()]
    assert printed[: len(expected)] == expected, f"{command.where}: `{command.text}` printed\n" + "\n".join(
        printed)


# --- the tests -------------------------------------------------------------------------------------


def test_commands_are_found_and_every_skip_names_a_command():
    commands = all_commands()
    texts = [c.text for c in commands]
    assert any(t.startswith("python3 -m venv .venv && .venv/bin/pip install -e . &&") for t in texts)
    for pattern in SKIPPED:  # a skip that matches nothing is stale
        assert any(re.search(pattern, t) for t in texts), f"SKIPPED pattern {pattern!r} matches no command"
    for command in commands:  # a bare `kgpt` is `command not found` in a new shell
        if command.language != "python":
            assert not re.match(r"^(kgpt|pip|pytest|python) ", command.text), command.where


def test_tiny_settings_go_after_each_training_command_before_its_comment():
    text = "python3 -m venv .venv && .venv/bin/kgpt train pipelines/tiny.toml --set a.b='x # y'  # note"
    assert with_tiny_settings(text) == (
        f"python3 -m venv .venv && .venv/bin/kgpt train pipelines/tiny.toml --set a.b='x # y' {TINY_TRAINING}")
    with pytest.raises(AssertionError, match="no tiny settings"):
        with_tiny_settings(".venv/bin/kgpt baseline bigram pipelines/new.toml")


def test_console_blocks_give_commands_their_output_and_outputs_that_drift_fail(tmp_path):
    (tmp_path / "doc.md").write_text(textwrap.dedent("""\
        ```console
        $ .venv/bin/kgpt export checkpoints/tiny \\
            --name tiny
        Exported checkpoints/tiny to saved_models/tiny/1
        $ curl -d '{"a":
           1}' http://x
        {"b": 2}
        ```
        """))
    export, curl = document_commands(tmp_path / "doc.md", "doc.md")
    assert (export.where, export.output) == ("doc.md:2", ["Exported checkpoints/tiny to saved_models/tiny/1"])
    assert curl.text == "curl -d '{\"a\":\n   1}' http://x" and curl.output == ['{"b": 2}']
    check_output(export, ["Exported checkpoints/tiny to saved_models/tiny/1", "more"], "/r")
    with pytest.raises(AssertionError, match="printed"):
        check_output(export, ["Exported checkpoints/tiny to saved_models/tiny/2"], "/r")
    with pytest.raises(AssertionError, match="answered"):  # an error the README does not show
        check_output(curl, ['{"error": "Servable not found"}'], "/r")


@pytest.mark.slow
def test_readme_commands_run_as_pasted(tmp_path):
    repository, environment = make_sandbox(tmp_path)
    servers, ran, skipped = {}, [], []
    started = time.monotonic()
    try:
        for command in all_commands():
            reason = skip_reason(command)
            if reason:
                skipped.append(f"{command.where}: {command.text.splitlines()[0]}  ({reason})")
                continue
            began = time.monotonic()
            if command.text.startswith(".venv/bin/kgpt serve "):
                port = _port(command.text)
                if port in servers:
                    stop_server(servers.pop(port))
                servers[port], printed = start_server(command, repository, environment, tmp_path)
            else:
                if command.language == "python":
                    argv, stdin = [str(repository / ".venv/bin/python"), "-"], command.text
                else:
                    argv, stdin = ["bash", "-c", with_tiny_settings(command.text)], None
                result = subprocess.run(argv, input=stdin, cwd=repository, env=environment, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
                assert result.returncode == 0, (
                    f"{command.where}: `{argv[-1] if stdin is None else 'python block'}` exited with "
                    f"{result.returncode}:\n{result.stdout[-4000:]}")
                printed = result.stdout.splitlines()
            check_output(command, printed, repository)
            ran.append(f"{time.monotonic() - began:6.1f}s  {command.where}: {command.text.splitlines()[0]}")
    finally:
        for process in servers.values():
            stop_server(process)
    print(f"\nREADME commands run: {len(ran)} in {time.monotonic() - started:.0f} s", *ran,
          f"skipped: {len(skipped)}", *skipped, sep="\n  ")
