#!/usr/bin/env python3
"""The chart README's values table, made from values.yaml's comments.

    python3 tests/helm/values_table.py --write   # rewrite the table in charts/heterotune/README.md
    python3 tests/helm/values_table.py --check   # fail when it is stale or a value has no comment
    python3 tests/helm/values_table.py --chart heterotune-site --write   # another chart's

Each value is documented by the comment lines right above its key. A
documented key whose children have no comments of their own is one value
(its default is the whole block, e.g. podSecurityContext); otherwise its
children are the values. tests/helm/check.sh runs --check.
"""
import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
BEGIN, END = "<!-- values-table:begin -->", "<!-- values-table:end -->"


def parse(text):
    """(path, description, line) for every key, in file order."""
    keys, stack, comment = [], [], []
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped:
            comment = []
            continue
        indent = len(line) - len(line.lstrip())
        if stripped.startswith("#"):
            comment.append(stripped.lstrip("#").strip())
            continue
        m = re.match(r"([A-Za-z0-9_.-]+):(\s|$)", stripped)
        if not m or stripped.startswith("- "):
            comment = []
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [m.group(1)])
        stack.append((indent, m.group(1)))
        keys.append((path, " ".join(c for c in comment if not c.startswith("- ")), n))
        comment = []
    return keys


def get(values, path):
    for k in path.split("."):
        values = values[k]
    return values


def rows(values_file):
    """(value, default, description) rows and the undocumented values."""
    text = values_file.read_text()
    values = yaml.safe_load(text)
    keys = parse(text)
    described = {p: d for p, d, _ in keys}
    out, missing = [], []
    for path, desc, _ in keys:
        children = [p for p in described if p.startswith(path + ".")]
        parent_is_value = any(
            path.startswith(q + ".") and described[q] and not any(described[c] for c in described if c.startswith(q + "."))
            for q in described
        )
        if parent_is_value:
            continue
        if children and (not desc or any(described[c] for c in children)):
            continue  # a section: its children are the values
        if not desc:
            missing.append(path)
            continue
        default = json.dumps(get(values, path), separators=(", ", ": "))
        out.append((path, default, desc))
    return out, missing


def table(values_file):
    out, missing = rows(values_file)
    lines = ["| value | default | description |", "|---|---|---|"]
    for path, default, desc in out:
        lines.append(f"| `{path}` | `{default}` | {desc.replace('|', '/')} |")
    return "\n".join(lines), missing


def main():
    args = sys.argv[1:]
    chart = "heterotune"
    if "--chart" in args:
        i = args.index("--chart")
        chart = args[i + 1]
        del args[i : i + 2]
    mode = args[0] if args else "--check"
    values_file = ROOT / "charts" / chart / "values.yaml"
    README = ROOT / "charts" / chart / "README.md"
    body, missing = table(values_file)
    if missing:
        sys.exit(f"charts/{chart}/values.yaml: no comment above " + ", ".join(missing))
    readme = README.read_text()
    if BEGIN not in readme or END not in readme:
        sys.exit(f"{README}: no {BEGIN} ... {END} block")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{body}\n{END}{tail}"
    if mode == "--write":
        README.write_text(new)
        print(f"wrote {README}")
    elif new != readme:
        sys.exit(f"{README}: the values table is stale: run python3 tests/helm/values_table.py --chart {chart} --write")
    else:
        print(f"values table: ok ({body.count(chr(10)) - 1} values, each described)")


if __name__ == "__main__":
    main()
