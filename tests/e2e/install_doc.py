#!/usr/bin/env python3
"""Checks that docs/install.md and tests/e2e/run.sh cannot drift apart.

    python3 tests/e2e/install_doc.py            # check (tests/helm/check.sh runs it)
    python3 tests/e2e/install_doc.py --list     # print the doc's commands, as compared
    python3 tests/e2e/install_doc.py --self-test  # show the check fails on drift
    python3 tests/e2e/install_doc.py --fake-run   # also run run.sh --kind against fake_cluster.py

The convention:
- the doc's commands are the lines of its ```sh blocks (a line ending in a
  backslash continues on the next; blank lines and # comments are skipped).
  Every other fenced block must be tagged yaml or text, so no command hides
  in an untagged block;
- run.sh's settings block (between `# --- settings` and `# --- end of
  settings`, assignments only) is evaluated by bash with an empty
  environment; in every line of run.sh, `$name` and `${name}` of a setting are
  replaced by its value (so the doc writes the defaults: heterotune-system,
  ghcr.io/heterotune/operator, ...);
- both sides are split into shell words (quotes removed, operators such as
  |, ||, &&, &, ; and redirections as words of their own); a doc command
  must occur in one logical line of run.sh as a whole command: it starts the
  line or follows an operator, a keyword (if, then, do, ...) or environment
  assignments (NAME=value), and it ends the line or is followed by an
  operator or a redirection;
- the doc keeps the steps of the install path (REQUIRED, in this order where
  ORDER says so), and so does run.sh;
- with --fake-run, `run.sh --kind --no-build` runs against fake_cluster.py
  (kubectl, helm, kind and curl that answer as a cluster where the trial
  succeeded) and must pass; the doc's kubectl, helm, kind and curl calls
  (pipelines split) must be among its calls, in the doc's order.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs/install.md"
RUN = ROOT / "tests/e2e/run.sh"
README = ROOT / "README.md"

# The steps of the install path: each must start one of the doc's commands.
REQUIRED = [
    "kind create cluster",
    "scripts/build-images.sh --kind",
    "kind load docker-image",
    "kubectl apply --server-side -f charts/heterotune/crds/",
    "helm install heterotune charts/heterotune",
    "kubectl -n heterotune-trial apply -f tests/e2e/minio.yaml",
    "kubectl -n heterotune-trial get ft -w",
    "kubectl -n heterotune-trial get ft e2e -o wide",
    "kubectl -n heterotune-system port-forward svc/heterotune",
    "kubectl -n heterotune-system get configmap heterotune-dashboard",
    "helm upgrade heterotune charts/heterotune",
    "kubectl delete ft --all -A",
    "helm uninstall heterotune",
    "kubectl delete crd federatedtunes.heterotune.dev",
]
# The tools fake_cluster.py stands in for, and the doc's commands run.sh runs
# only when a check fails.
FAKED = ("kubectl", "helm", "kind", "curl")
ON_FAILURE_ONLY = {"kubectl -n heterotune-system logs deploy/heterotune --tail=200"}
# (earlier, later): the first command starting with `earlier` comes before the
# last one starting with `later` (the CRD before the upgrade; the
# FederatedTunes while the operator runs, then the release, then the CRD).
ORDER = [
    ("kubectl apply --server-side -f charts/heterotune/crds/", "helm install heterotune"),
    ("kubectl delete ft --all -A", "helm uninstall heterotune"),
    ("helm uninstall heterotune", "kubectl delete crd federatedtunes.heterotune.dev"),
]
UPGRADE = ("kubectl apply --server-side -f charts/heterotune/crds/", "helm upgrade heterotune")

OPERATORS = {"|", "||", "&&", "&", ";", ";;", "|&"}
REDIRECTS = {">", ">>", "<", "<<", ">&", "<&", "&>", "&>>", "<<<"}
KEYWORDS = {"if", "then", "else", "elif", "do", "while", "until", "!", "{", "(", "time"}
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
SETTINGS_BEGIN, SETTINGS_END = "# --- settings", "# --- end of settings"


class Drift(Exception):
    """The doc and run.sh disagree; the message says where and how to fix it."""


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, line) with backslash-newline continuations joined."""
    out, buf, start = [], "", 0
    for n, line in enumerate(text.splitlines(), 1):
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        out.append((start, buf + line))
        buf = ""
    if buf:
        out.append((start, buf))
    return out


def words(line: str) -> list[str]:
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    return list(lex)


def doc_commands(text: str) -> list[tuple[int, str]]:
    """(line number, command) of every ```sh block; refuses other untagged blocks."""
    cmds, block, tag, start = [], None, "", 0
    for n, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^\s*```\s*(\S*)", line)
        if fence and block is None:
            tag, block, start = fence.group(1), [], n
            if tag not in ("sh", "yaml", "text"):
                raise Drift(f"docs/install.md:{n}: a fenced block tagged {tag!r}: tag it sh "
                            "(a command run.sh runs), yaml or text")
        elif fence:
            if tag == "sh":
                cmds += [(start + b, c) for b, c in logical_lines("\n".join(block))
                         if c.strip() and not c.lstrip().startswith("#")]
            block = None
        elif block is not None:
            block.append(line)
    if block is not None:
        raise Drift("docs/install.md: a fenced block is not closed")
    return cmds


def settings(script: str) -> dict[str, str]:
    """run.sh's settings block, evaluated by bash with an empty environment."""
    try:
        body = script.split(SETTINGS_BEGIN, 1)[1].split(SETTINGS_END, 1)[0]
    except IndexError:
        raise Drift(f"tests/e2e/run.sh: no '{SETTINGS_BEGIN}' ... '{SETTINGS_END}' block") from None
    lines = [line for line in body.splitlines()[1:] if line.strip() and not line.lstrip().startswith("#")]
    names = []
    for line in lines:
        m = re.match(r"([a-z_][a-z0-9_]*)=", line)
        if not m or "$(" in line or "`" in line:
            raise Drift(f"tests/e2e/run.sh settings: {line!r} is not a plain assignment (name=value, no command)")
        names.append(m.group(1))
    program = "\n".join(lines) + "\n" + "".join(f'printf "%s\\0%s\\0" {n} "${n}"\n' for n in names)
    out = subprocess.run(["bash", "-c", program], env={}, capture_output=True, text=True, check=True).stdout
    items = out.split("\0")[:-1]
    return dict(zip(items[::2], items[1::2]))


def substitute(line: str, values: dict[str, str]) -> str:
    for name in sorted(values, key=len, reverse=True):
        line = re.sub(r"\$\{" + name + r"\}|\$" + name + r"(?![A-Za-z0-9_])", lambda _: values[name], line)
    return line


def run_commands(script: str) -> list[list[str]]:
    """The words of every logical line of run.sh, settings substituted."""
    values = settings(script)
    out = []
    for _, line in logical_lines(script):
        try:
            out.append(words(substitute(line, values)))
        except ValueError:
            continue  # not one shell line (e.g. inside a multi-line string): never matches
    return out


def starts_command(ws: list[str], i: int) -> bool:
    j = i
    while j > 0 and ASSIGNMENT.match(ws[j - 1]):
        j -= 1
    return j == 0 or ws[j - 1] in OPERATORS or ws[j - 1] in KEYWORDS


def ends_command(ws: list[str], k: int) -> bool:
    if k == len(ws) or ws[k] in OPERATORS or ws[k] in REDIRECTS or ws[k] == ")":
        return True
    return ws[k].isdigit() and k + 1 < len(ws) and ws[k + 1] in REDIRECTS


def run_lines(cmd: list[str], lines: list[list[str]]) -> list[int]:
    """Indices of the run.sh lines that run `cmd` as a whole command."""
    n = len(cmd)
    return [k for k, ws in enumerate(lines)
            if any(ws[i:i + n] == cmd and starts_command(ws, i) and ends_command(ws, i + n)
                   for i in range(len(ws) - n + 1))]


def check(doc: str, script: str, readme: str) -> list[str]:
    """Every problem found; empty when the doc, run.sh and the README agree."""
    problems = []
    cmds = doc_commands(doc)
    lines = run_commands(script)
    flat = [(n, " ".join(words(c))) for n, c in cmds]
    where = {}
    for (n, c), (_, text) in zip(cmds, flat):
        where[text] = run_lines(words(c), lines)
        if not where[text]:
            problems.append(f"docs/install.md:{n}: `{text}` is not a command tests/e2e/run.sh runs "
                            "(add it to run.sh, or change the doc to run.sh's command with the settings' defaults)")
    first = {}
    last = {}
    for i, (_, text) in enumerate(flat):
        for step in REQUIRED + [a for a, _ in ORDER + [UPGRADE]] + [b for _, b in ORDER + [UPGRADE]]:
            if text == step or text.startswith(step + " "):
                first.setdefault(step, i)
                last[step] = i
    for step in REQUIRED:
        if step not in first:
            problems.append(f"docs/install.md: no command starts with `{step}` (a step of the install path)")
    for a, b in ORDER:
        if a in first and b in last and first[a] > last[b]:
            problems.append(f"docs/install.md: `{a}` must come before `{b}`")
        run_a = [k for i, (_, t) in enumerate(flat) if i == first.get(a) for k in where[t]]
        run_b = [k for i, (_, t) in enumerate(flat) if i == last.get(b) for k in where[t]]
        if run_a and run_b and min(run_a) > max(run_b):
            problems.append(f"tests/e2e/run.sh: `{a}` must come before `{b}`")
    a, b = UPGRADE
    if a in last and b in last and last[a] > last[b]:
        problems.append(f"docs/install.md: the upgrade must apply the CRD (`{a}`) before `{b}`")
    section = re.search(r"^## On Kubernetes\n(.*?)(?=^## |\Z)", readme, re.M | re.S)
    if not section or "docs/install.md" not in section.group(1):
        problems.append("README.md: no '## On Kubernetes' section linking docs/install.md")
    return problems


def self_test(doc: str, script: str, readme: str) -> None:
    """The check fails on each kind of drift it is there to catch."""
    extra = doc + "\n```sh\nkubectl -n heterotune-trial delete pods --all\n```\n"
    helm_line = next(line for line in script.splitlines() if line.startswith("helm install heterotune"))
    ft, uninstall = "kubectl delete ft --all -A", "helm uninstall heterotune"
    doc_swapped = swap_lines(doc, ft, uninstall)
    run_swapped = swap_lines(script, "  kubectl delete ft --all -A", "  helm uninstall heterotune")
    cases = {
        "a doc command run.sh does not run": ((extra, script, readme), "is not a command"),
        "run.sh no longer runs the doc's helm install":
            ((doc, script.replace(helm_line, "helm install x \\"), readme), "is not a command"),
        "a changed default in run.sh's settings":
            ((doc, script.replace("op_ns=heterotune-system", "op_ns=ht-system"), readme), "is not a command"),
        "the doc's uninstall order reversed": ((doc_swapped, script, readme), f"docs/install.md: `{ft}` must come before"),
        "run.sh's uninstall order reversed": ((doc, run_swapped, readme), f"tests/e2e/run.sh: `{ft}` must come before"),
        "an untagged command block": ((doc + "\n```\nhelm install x\n```\n", script, readme), "tag it sh"),
        "the README's section gone": ((doc, script, readme.replace("## On Kubernetes", "## Elsewhere")), "README.md"),
    }
    for name, ((d, s, r), expected) in cases.items():
        try:
            found = check(d, s, r)
        except Drift as e:
            found = [str(e)]
        hits = [p for p in found if expected in p]
        if not hits:
            sys.exit(f"install_doc.py --self-test: with {name}, no problem says {expected!r}: {found}")
        print(f"self-test: {name}: caught ({hits[0][:90]}...)")


def swap_lines(text: str, a: str, b: str) -> str:
    """`text` with its first line starting with `a` and its first starting with `b` swapped."""
    lines = text.split("\n")
    i = next(k for k, line in enumerate(lines) if line.startswith(a))
    j = next(k for k, line in enumerate(lines) if line.startswith(b))
    lines[i], lines[j] = lines[j], lines[i]
    return "\n".join(lines)


def fake_calls() -> list[list[str]] | str:
    """The calls of `run.sh --kind --no-build` against fake_cluster.py, or why it failed."""
    with tempfile.TemporaryDirectory() as tmp:
        bin_dir, log = Path(tmp, "bin"), Path(tmp, "calls.jsonl")
        bin_dir.mkdir()
        for tool in FAKED:
            (bin_dir / tool).symlink_to(Path(__file__).with_name("fake_cluster.py"))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("E2E_", "KUBECONFIG"))
               and k not in ("OPERATOR_IMAGE", "TRAINER_IMAGE")}
        env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_CLUSTER_LOG=str(log))
        r = subprocess.run(["bash", str(RUN), "--kind", "--no-build"], env=env, capture_output=True,
                           text=True, timeout=300)
        if r.returncode != 0 or "OK tests/e2e" not in r.stdout:
            tail = "\n    ".join((r.stdout + r.stderr).splitlines()[-15:])
            return f"tests/e2e/run.sh --kind --no-build against fake_cluster.py exits {r.returncode}:\n    {tail}"
        return [json.loads(line) for line in log.read_text().splitlines()]


def called_in_order(doc: str, calls: list[list[str]]) -> list[str]:
    """The doc's commands of the faked tools that `calls` lacks, in the doc's order."""
    problems, pos = [], 0
    for n, c in doc_commands(doc):
        ws = words(c)
        if " ".join(ws) in ON_FAILURE_ONLY:
            continue
        simple = [[]]
        for w in ws:
            simple.append([]) if w == "|" else simple[-1].append(w)
        # The commands of a pipeline start together: any order among them.
        start = pos
        for cmd in (x for x in simple if x and x[0] in FAKED):
            found = next((i for i in range(start, len(calls)) if calls[i] == cmd), None)
            if found is None:
                problems.append(f"docs/install.md:{n}: `{' '.join(cmd)}` was not called (after the doc's "
                                "previous commands) by run.sh --kind against fake_cluster.py")
            else:
                pos = max(pos, found + 1)
    return problems


def main() -> None:
    doc, script, readme = DOC.read_text(), RUN.read_text(), README.read_text()
    if "--list" in sys.argv:
        for n, c in doc_commands(doc):
            print(f"{n}: {' '.join(words(c))}")
        return
    if "--self-test" in sys.argv:
        self_test(doc, script, readme)
    try:
        problems = check(doc, script, readme)
    except Drift as e:
        problems = [str(e)]
    if not problems and "--fake-run" in sys.argv:
        calls = fake_calls()
        problems = [calls] if isinstance(calls, str) else called_in_order(doc, calls)
        if not problems and "--self-test" in sys.argv:
            swapped = swap_lines(doc, "kubectl -n heterotune-trial get ft e2e -o wide",
                                 "kubectl -n heterotune-trial describe ft e2e")
            if not called_in_order(swapped, calls):
                sys.exit("install_doc.py --self-test: the fake run's order check passes with two commands swapped")
            print("self-test: the doc's commands in another order than run.sh's: caught")
        if not problems:
            print("install_doc.py: run.sh --kind passes against fake_cluster.py, calling the doc's commands in order")
    if problems:
        sys.exit("install_doc.py: docs/install.md and tests/e2e/run.sh drifted:\n  " + "\n  ".join(problems))
    print(f"install_doc.py: the {len(doc_commands(doc))} commands of docs/install.md are run by tests/e2e/run.sh")


if __name__ == "__main__":
    main()
