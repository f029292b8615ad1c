"""Bad input: every case is skipped with its reason (default) or raises DataError naming the record (strict).

Also: truncation keeps what fits (dropping whole images past the cut), skipped records travel out of DataLoader
workers inside batches and are counted once by the main process, and no other record is ever substituted.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_data_common import record, tiny_settings, tiny_tokenizer, write_image

from mlcd_vl.data.collate import PaddingCollator
from mlcd_vl.data.dataset import SupervisedDataset, scan
from mlcd_vl.data.problems import DataError, Problem, ProblemLog, SkippedRecord
from mlcd_vl.data.config import DataConfig
from mlcd_vl.data.samples import Sample
from mlcd_vl.data.sources import JsonRecords

ASK, ANSWER = "<image>\nWhat colour is it?", "It is red."


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_image(root / "good.png", (80, 60))
    write_image(root / "big.png", (300, 300))
    (root / "empty.png").write_bytes(b"")
    full = (root / "good.png").read_bytes()
    (root / "truncated.png").write_bytes(full[: len(full) // 2])
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (root / "notes.png").write_text("not an image at all")
    return root


BAD_CASES = {
    "missing": (record("missing", ASK, ANSWER, image="nowhere.png"), Problem.IMAGE_MISSING),
    "empty": (record("empty", ASK, ANSWER, image="empty.png"), Problem.IMAGE_EMPTY),
    "truncated": (record("truncated", ASK, ANSWER, image="truncated.png"), Problem.IMAGE_UNREADABLE),
    "corrupt": (record("corrupt", ASK, ANSWER, image="corrupt.png"), Problem.IMAGE_UNREADABLE),
    "not_image": (record("not_image", ASK, ANSWER, image="notes.png"), Problem.IMAGE_UNREADABLE),
    "too_large": (record("too_large", ASK, ANSWER, image="big.png"), Problem.IMAGE_TOO_LARGE),
    "two_placeholders_one_image": (record("two_placeholders_one_image", "<image><image>\nWhat?", ANSWER,
                                          image="good.png"), Problem.IMAGE_COUNT_MISMATCH),
    "image_without_placeholder": (record("image_without_placeholder", "What?", ANSWER, image="good.png"),
                                  Problem.IMAGE_COUNT_MISMATCH),
    "placeholder_without_image": (record("placeholder_without_image", ASK, ANSWER), Problem.IMAGE_COUNT_MISMATCH),
    "only_human": (record("only_human", "Hello?"), Problem.BAD_CONVERSATION),
    "no_turns": ({"id": "no_turns", "conversations": []}, Problem.BAD_CONVERSATION),
    "unknown_role": ({"id": "unknown_role", "conversations": [{"from": "human", "value": "Hi"},
                                                              {"from": "robot", "value": "Beep"}]},
                     Problem.BAD_CONVERSATION),
    "no_conversations": ({"id": "no_conversations", "image": "good.png"}, Problem.BAD_RECORD),
    "empty_answer": (record("empty_answer", ASK, " \n\t ", image="good.png"), Problem.EMPTY_ANSWER),
    "empty_second_answer": (record("empty_second_answer", ASK, ANSWER, "And the shape?", "", image="good.png"),
                            Problem.EMPTY_ANSWER),
    "ends_on_user_turn": (record("ends_on_user_turn", ASK, ANSWER, "And the shape?", image="good.png"),
                          Problem.ENDS_ON_USER_TURN),
    "no_supervised_after_truncation": (record("no_supervised_after_truncation", "Tell me " + "more and more " * 40,
                                              ANSWER), Problem.NO_SUPERVISED_TOKENS),
    "truncation_cuts_image": (record("truncation_cuts_image", ASK, ANSWER, image="good.png"),
                              Problem.TRUNCATION_CUTS_IMAGE),
}
MAX_LENGTH = {"no_supervised_after_truncation": 60, "truncation_cuts_image": 30}


def dataset_for(tokenizer, folder, tmp_path, records, strict=False, max_length=4096):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    config = DataConfig(max_length=max_length, strict=strict, max_image_pixels=200 * 200)
    return SupervisedDataset(JsonRecords(path, str(folder)), tokenizer, tiny_settings("anyres"), config)


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_record_skipped_or_strict(tokenizer, folder, tmp_path, case):
    data, problem = BAD_CASES[case]
    max_length = MAX_LENGTH.get(case, 4096)
    dataset = dataset_for(tokenizer, folder, tmp_path, [data], max_length=max_length)
    skipped = dataset[0]
    assert isinstance(skipped, SkippedRecord), skipped
    assert (skipped.record_id, skipped.problem) == (case, problem)
    strict = dataset_for(tokenizer, folder, tmp_path, [data], strict=True, max_length=max_length)
    with pytest.raises(DataError, match=case) as raised:
        strict[0]
    assert raised.value.skipped.problem == problem


def test_scan_finds_problems_without_decoding_except_pixel_damage(tokenizer, folder, tmp_path):
    records = [data for data, _ in BAD_CASES.values()] + [record("good", ASK, ANSWER, image="good.png")]
    dataset = dataset_for(tokenizer, folder, tmp_path, records)
    headers = {s.record_id for s in scan(dataset).skipped}
    decoded = {s.record_id for s in scan(dataset, decode_images=True).skipped}
    assert "good" not in decoded and "truncated" in decoded and "truncated" not in headers
    assert decoded - headers == {"truncated"}


def test_a_repeated_record_is_skipped_once_its_first_copy_is_kept(tokenizer, folder, tmp_path):
    """Same id and content again: skipped (strict: an error); same id with other content: kept, a different sample;
    the same place drawn twice by a mixture (a file listed twice to up-weight it): kept."""
    first = record("a", ASK, ANSWER, image="good.png")
    records = [first, record("b", ASK, ANSWER, image="good.png"), dict(first),
               record("a", ASK, "It is blue.", image="good.png"), dict(first)]
    dataset = dataset_for(tokenizer, folder, tmp_path, records)
    log = ProblemLog(log_first=0)
    table = scan(dataset, log=log)
    assert [(s.record_id, s.problem) for s in table.skipped] == [("a", Problem.DUPLICATE_RECORD)] * 2
    assert "data.json#0" in table.skipped[0].detail
    assert (table.lengths > 0).tolist() == [True, True, False, True, False]
    assert log.counts == {"duplicate_record": 2}
    with pytest.raises(DataError, match="duplicate_record"):
        scan(dataset_for(tokenizer, folder, tmp_path, records, strict=True))

    (tmp_path / "mix.yaml").write_text("datasets:\n  - json_path: data.json\n  - json_path: data.json\n")
    (tmp_path / "data.json").write_text(json.dumps(records[:2]))
    mixture = SupervisedDataset.from_config(DataConfig(train=str(tmp_path / "mix.yaml"), image_folder=str(folder),
                                                       max_image_pixels=200 * 200),
                                            tokenizer, tiny_settings("anyres"))
    assert len(mixture) == 4 and scan(mixture).skipped == []


def test_truncation_keeps_whole_images_only(tokenizer, folder, tmp_path):
    data = record("two", "<image>\nfirst then a long question " + "again " * 10 + "<image>", ANSWER,
                  image=["good.png", "good.png"])
    full = dataset_for(tokenizer, folder, tmp_path, [data])[0]
    (first_start, first_count), (second_start, _) = full.image_spans
    assert isinstance(full, Sample) and not full.truncated
    cut = dataset_for(tokenizer, folder, tmp_path, [data], max_length=second_start)[0]
    assert isinstance(cut, SkippedRecord) and cut.problem == Problem.NO_SUPERVISED_TOKENS  # the answer is cut off
    answer_first = record("ans", "<image>\nQ?", "A long answer " + "with words " * 30, "<image>\nAnd this?", "Ok.",
                          image=["good.png", "good.png"])
    whole = dataset_for(tokenizer, folder, tmp_path, [answer_first])[0]
    limit = whole.image_spans[1][0]
    kept = dataset_for(tokenizer, folder, tmp_path, [answer_first], max_length=limit)[0]
    assert kept.truncated and kept.length == limit and len(kept.images) == 1 and kept.image_spans[0][1] > 0
    assert int((kept.labels[1:] != -100).sum()) > 0


def test_skips_travel_out_of_workers_and_are_counted_once(tokenizer, folder, tmp_path):
    good = [record(f"good{i}", ASK, f"Answer {i}.", image="good.png") for i in range(6)]
    bad = [BAD_CASES[name][0] for name in ("missing", "corrupt", "unknown_role")]
    records = good[:2] + bad[:1] + good[2:4] + bad[1:] + good[4:]
    dataset = dataset_for(tokenizer, folder, tmp_path, records)
    collator = PaddingCollator.for_model(tokenizer)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=collator)
    log, seen = ProblemLog(log_first=2), []
    for batch in loader:
        log.extend(batch["skipped"])
        seen += batch["record_ids"]
        assert len(batch["images"]) == len(batch["record_ids"])  # one image per good record, never a stand-in
    assert seen == [r["id"] for r in good]
    assert log.to_dict()["counts"] == {"bad_conversation": 1, "image_missing": 1, "image_unreadable": 1}
    assert "image_missing: 1 (e.g. missing)" in log.summary()
    assert log.end_epoch(0).startswith("epoch 0: skipped records: 3")


def test_malformed_jsonl_line_is_reported(tokenizer, folder, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(record("ok", ASK, ANSWER, image="good.png")) + "\n{broken\n")
    dataset = SupervisedDataset(JsonRecords(path, str(folder)), tokenizer, tiny_settings(), DataConfig())
    assert len(dataset) == 1 and isinstance(dataset[0], Sample)
    assert [p.problem for p in dataset.load_problems] == [Problem.BAD_RECORD]
    assert "line 2" in dataset.load_problems[0].record_id
