"""The MCUB / AVQA / MUSIC-AVQA harness: metric parsers, VQA normalisation, question-file checks, media reading, and an
end-to-end resumable run on a tiny composite saved in tmp."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hub_cache import cache_repos
from PIL import Image

from benchmarks.mcub import run
from benchmarks.mcub.data import BenchmarkError, attach_answers, prepare_questions, read_answers, read_questions
from benchmarks.mcub.media import load_audio, load_video, pad_to_square, pyav_available, resample
from benchmarks.mcub.metrics import (
    first_letter,
    forgiving_choice,
    music_avqa_match,
    question_options,
    strict_match,
    summarize,
    vqa_normalize,
)
from composition.saving import save_composite
from conversations.media import write_wav
from fixtures.tiny_composite import build_tiny_composite


QUESTION = "What do they have in common?\nA. red\nB. round\nC. large\nD. loud\nAnswer with the option's letter."
MODALITIES = {
    "image": {"kind": "image", "placeholder": "<image>"},
    "audio": {"kind": "audio", "placeholder": "<audio>"},
}


# --------------------------------------------------------------------------------------------------------------------
# Metrics


@pytest.mark.parametrize(
    ("reply", "strict", "forgiving"),
    [
        ("B", "B", "B"),
        ("B. round", "B", "B"),
        ("B) round", "B", "B"),
        ("The answer is B.", "T", "B"),
        ("(B)", "(", "B"),
        ("Option B", "O", "B"),
        ("b", "b", "B"),
        ("Answer: (d)", "A", "D"),
        ("round", "r", "B"),  # repeats option B's text
        ("They are all loud.", "T", "D"),
        ("A dog and a cat", "A", None),  # the article, not option A
        ("red or round", "r", None),  # two options' texts: ambiguous
        ("I think so", "I", None),
        ("", None, None),
    ],
)
def test_strict_first_letter_and_forgiving_parse(reply, strict, forgiving):
    assert first_letter(reply) == strict
    assert forgiving_choice(reply, QUESTION) == forgiving


def test_strict_and_forgiving_scores_differ_where_they_should():
    records = [
        {"text": "B", "answer": "B", "prompt": QUESTION},  # both
        {"text": "The answer is B.", "answer": "B", "prompt": QUESTION},  # forgiving only
        {"text": "round", "answer": "B", "prompt": QUESTION},  # forgiving only
        {"text": "Both are red", "answer": "B", "prompt": QUESTION},  # strict only ("B" of "Both"); forgiving reads A
        {"text": "b", "answer": "B", "prompt": QUESTION},  # forgiving only (the paper's check is case-sensitive)
        {"text": "C", "answer": "B", "prompt": QUESTION},  # neither
    ]
    summary = summarize(records, "mcub")
    assert strict_match("Both are red", "B") and not strict_match("b", "B")
    assert summary["metrics"]["first_letter"] == {"correct": 2, "total": 6, "accuracy": 2 / 6}
    assert summary["metrics"]["forgiving"]["correct"] == 4
    assert summary["unparsed"] == 0


def test_question_options_inline_and_on_lines():
    assert question_options(QUESTION) == {"A": "red", "B": "round", "C": "large", "D": "loud"}
    inline = "Which? (A) a violin (B) two drums (C) a flute (D) nothing. Answer directly."
    assert question_options(inline) == {"A": "a violin", "B": "two drums", "C": "a flute", "D": "nothing"}
    assert question_options("Is it a cat? Answer yes or no.") == {}


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("Two", "2"),
        ("The piano.", "piano"),
        ("Yes, it is.", "yes it is"),
        ("dont know", "don't know"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("left-hand side", "left hand side"),
        ("It's the violin!", "it 's violin"),
        ("There are THREE guitars.", "there are 3 guitars"),
        ("no\nyes", "no yes"),
    ],
)
def test_vqa_normalize(text, normalized):
    assert vqa_normalize(text) == normalized


def test_music_avqa_exact_match_after_normalisation():
    assert music_avqa_match("Two.", "two") and music_avqa_match("The Guitar", "guitar")
    assert not music_avqa_match("two guitars", "two")  # the whole output must match
    summary = summarize([{"text": "Yes.", "answer": "yes"}, {"text": "no, it is not", "answer": "no"}], "music-avqa")
    assert summary["metrics"] == {"vqa_exact_match": {"correct": 1, "total": 2, "accuracy": 0.5}}


# --------------------------------------------------------------------------------------------------------------------
# Question and answer files


def _question(identifier, prompt, **media):
    return {
        "id": identifier,
        "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": None}],
        "modal_inputs": media,
    }


def _answer(identifier, gold):
    return {"id": identifier, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": gold}]}


def _write(path, data):
    path.write_text(json.dumps(data))
    return path


def test_answers_missing_for_some_questions_are_listed(tmp_path):
    items = [_question(index, "<image> ?", vision=["a.png"]) for index in range(3)]
    questions = read_questions(_write(tmp_path / "q.json", items))
    answers = read_answers(_write(tmp_path / "a.json", [_answer(0, "A")]))
    with pytest.raises(BenchmarkError, match=r"no answer for 2 of 3 questions \(ids 1, 2\)"):
        attach_answers(questions, answers, tmp_path / "a.json")
    with pytest.raises(BenchmarkError, match="no gold answer"):
        read_answers(_write(tmp_path / "bad.json", [_answer(0, None)]))
    with pytest.raises(BenchmarkError, match="appears more than once"):
        read_questions(_write(tmp_path / "dup.json", [_question(1, "?"), _question("1", "?")]))
    with pytest.raises(BenchmarkError, match="does not exist"):
        read_questions(tmp_path / "nothing.json")


def test_every_media_problem_is_reported_before_generation(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "present.png")
    questions = read_questions(
        _write(
            tmp_path / "q.json",
            [
                _question("ok", "<image> ?", vision=["present.png"]),
                _question("gone", "<image> <audio> ?", vision=["absent1.png"], audio=["absent2.wav"]),
                _question("depth", "<depth> ?", depth=["d.png"]),
                _question("count", "<image> <image> ?", vision=["present.png"]),
            ],
        )
    )
    with pytest.raises(BenchmarkError) as error:
        prepare_questions(questions, MODALITIES, tmp_path)
    message = str(error.value)
    assert "unknown modal_inputs keys" in message and "'depth'" in message
    assert "question 'count': <image> x2 for 1 file(s)" in message
    assert "2 media files missing" in message and "absent1.png" in message and "absent2.wav" in message


def test_a_modality_the_composite_lacks_is_an_error_or_skipped(tmp_path):
    np.save(tmp_path / "cloud.npy", np.zeros((10, 6), dtype=np.float32))
    Image.new("RGB", (8, 8)).save(tmp_path / "present.png")
    questions = read_questions(
        _write(
            tmp_path / "q.json",
            [
                _question(1, "<point> ?", point=["cloud.npy"]),
                _question(2, "<image> ?", vision=["present.png"]),
            ],
        )
    )
    with pytest.raises(BenchmarkError, match=r"no modality of kind point \(1 questions.*--skip-missing"):
        prepare_questions(questions, MODALITIES, tmp_path)
    prepared, skipped = prepare_questions(questions, MODALITIES, tmp_path, skip_missing=True)
    assert [entry.question.id for entry in prepared] == [2] and [question.id for question in skipped] == [1]
    assert prepared[0].items == (("image", tmp_path / "present.png"),)


def test_paper_placeholders_are_mapped_to_the_composites_own(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    questions = read_questions(_write(tmp_path / "q.json", [_question(1, "image: <image>\nWhat?", vision=["a.png"])]))
    prepared, _ = prepare_questions(questions, {"photo": {"kind": "image", "placeholder": "<photo>"}}, tmp_path)
    assert prepared[0].prompt == "image: <photo>\nWhat?"


@pytest.mark.skipif(pyav_available(), reason="PyAV is installed")
def test_containers_without_pyav_name_the_install_command(tmp_path):
    (tmp_path / "clip.mp4").write_bytes(b"")
    questions = read_questions(_write(tmp_path / "q.json", [_question(1, "<audio> ?", audio=["clip.mp4"])]))
    with pytest.raises(BenchmarkError, match="pip install av"):
        prepare_questions(questions, MODALITIES, tmp_path)


# --------------------------------------------------------------------------------------------------------------------
# Media


def test_resampling_keeps_a_tone_and_the_duration(tmp_path):
    rate, target, frequency = 44100, 16000, 440.0
    tone = np.sin(2 * math.pi * frequency * np.arange(rate) / rate).astype(np.float32)
    resampled = resample(tone, rate, target)
    assert resampled.shape == (target,)
    expected = np.sin(2 * math.pi * frequency * np.arange(target) / target)
    assert np.abs(resampled - expected)[200:-200].max() < 1e-2  # away from the edges, where the clip was cut
    write_wav(tmp_path / "low.wav", tone[:8000], 8000)  # a 1 s clip at 8 kHz
    assert load_audio(tmp_path / "low.wav", 16000).shape == (16000,)


def test_an_image_as_video_is_one_frame_and_images_pad_to_a_square(tmp_path):
    Image.new("RGB", (12, 6), (255, 0, 0)).save(tmp_path / "frame.jpg")
    assert load_video(tmp_path / "frame.jpg", num_frames=8).shape == (1, 6, 12, 3)
    square = pad_to_square(Image.new("RGB", (12, 6), (255, 0, 0)), (1, 2, 3))
    assert square.size == (12, 12) and square.getpixel((0, 0)) == (1, 2, 3) and square.getpixel((6, 6)) == (255, 0, 0)


# --------------------------------------------------------------------------------------------------------------------
# End to end


@pytest.fixture(scope="module")
def benchmark_files(tmp_path_factory):
    """A tiny 4-modality composite saved as a folder, four questions with their media and answers."""
    root = tmp_path_factory.mktemp("mcub")
    model, processor = build_tiny_composite()
    save_composite(model, processor, root / "composite")
    media = root / "media"
    media.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(media / "cat.png")
    write_wav(media / "bark.wav", rng.standard_normal(4000).astype(np.float32) * 0.1, 8000)  # resampled to 16 kHz
    np.save(media / "spin.npy", rng.integers(0, 255, (3, 36, 36, 3), dtype=np.uint8))
    np.save(media / "chair.npy", rng.standard_normal((200, 6)).astype(np.float32))
    questions = [
        _question("q1", "image: <image>\naudio: <audio>\n" + QUESTION, vision=["cat.png"], audio=["bark.wav"]),
        _question("q2", "video: <video>\npoint: <point>\n" + QUESTION, video=["spin.npy"], point=["chair.npy"]),
        _question(
            "q3",
            "<point> <video> <audio> <image> " + QUESTION,
            vision=["cat.png"],
            audio=["bark.wav"],
            video=["spin.npy"],
            point=["chair.npy"],
        ),
        _question("q4", "audio: <audio>\n" + QUESTION, audio=["bark.wav"]),
    ]
    _write(root / "questions.json", questions)
    _write(root / "answers.json", [_answer(f"q{i}", letter) for i, letter in enumerate("ABCD", start=1)])
    return root


def _run(root, output, *extra):
    return run.main(
        [
            "--model",
            str(root / "composite"),
            "--questions",
            str(root / "questions.json"),
            "--answers",
            str(root / "answers.json"),
            "--media-root",
            str(root / "media"),
            "--output",
            str(output),
            "--batch-size",
            "3",
            "--max-new-tokens",
            "2",
            "--device",
            "cpu",
            "--no-progress",
            *extra,
        ]
    )


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_end_to_end_run_is_batched_scored_and_resumable(benchmark_files, tmp_path, capsys):
    output = tmp_path / "out"
    assert _run(benchmark_files, output) == 0
    predictions = _lines(output / "predictions.jsonl")
    assert [line["id"] for line in predictions] == ["q1", "q2", "q3", "q4"]
    assert all(set(line) == {"id", "question_id", "prompt", "text"} for line in predictions)
    assert predictions[0]["prompt"].startswith("image: <image>\naudio: <audio>\n")
    results = json.loads((output / "results.json").read_text())
    assert results["counts"] == {
        "questions_in_file": 4,
        "selected": 4,
        "evaluated": 4,
        "skipped_missing_modality": 0,
        "generated_this_run": 4,
        "unparsed_by_forgiving_parse": results["counts"]["unparsed_by_forgiving_parse"],
    }
    expected = summarize(
        [{"text": line["text"], "answer": "ABCD"[i], "prompt": line["prompt"]} for i, line in enumerate(predictions)]
    )
    assert results["metrics"] == expected["metrics"] and set(results["metrics"]) == {"first_letter", "forgiving"}
    assert results["settings"]["max_new_tokens"] == 2 and results["settings"]["device"] == "cpu"
    assert "first_letter" in capsys.readouterr().out

    # A rerun generates nothing; a deleted line is generated again (alone now, so batching must not change it).
    assert _run(benchmark_files, output) == 0
    assert _lines(output / "predictions.jsonl") == predictions
    assert json.loads((output / "results.json").read_text())["counts"]["generated_this_run"] == 0
    kept = predictions[:1] + predictions[2:]
    (output / "predictions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in kept))
    assert _run(benchmark_files, output) == 0
    regenerated = _lines(output / "predictions.jsonl")
    assert [line["id"] for line in regenerated] == ["q1", "q3", "q4", "q2"] and regenerated[-1] == predictions[1]
    assert json.loads((output / "results.json").read_text())["counts"]["generated_this_run"] == 1

    # Other generation settings into the same folder are refused, with the reason on one line.
    assert _run(benchmark_files, output, "--max-new-tokens", "3") == 2
    assert "max_new_tokens: 2 then, 3 now" in capsys.readouterr().err


def test_end_to_end_limit_and_file_errors_exit_with_status_2(benchmark_files, tmp_path, capsys):
    _write(tmp_path / "answers.json", [_answer("q1", "A")])
    code = run.main(
        [
            "--model",
            str(benchmark_files / "composite"),
            "--questions",
            str(benchmark_files / "questions.json"),
            "--answers",
            str(tmp_path / "answers.json"),
            "--output",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2 and "no answer for 3 of 4 questions" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert _run(benchmark_files, tmp_path / "limited", "--limit", "2", "--task", "avqa") == 0
    results = json.loads((tmp_path / "limited" / "results.json").read_text())
    assert results["task"] == "avqa" and results["counts"]["evaluated"] == 2


def test_model_by_hub_id(benchmark_files, tmp_path, capsys):
    """--model takes a Hub id, as composites are shared: here served from the offline cache of this test session."""
    import huggingface_hub.constants

    cache_repos(Path(huggingface_hub.constants.HF_HOME), {"tiny-org/mcub-composite": benchmark_files / "composite"})
    output = tmp_path / "by-id"
    code = run.main(
        [
            "--model",
            "tiny-org/mcub-composite",
            "--questions",
            str(benchmark_files / "questions.json"),
            "--answers",
            str(benchmark_files / "answers.json"),
            "--media-root",
            str(benchmark_files / "media"),
            "--output",
            str(output),
            "--limit",
            "1",
            "--max-new-tokens",
            "2",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    results = json.loads((output / "results.json").read_text())
    assert results["model"] == "tiny-org/mcub-composite" and results["counts"]["evaluated"] == 1
    capsys.readouterr()
    code = run.main(
        [
            "--model",
            "tiny-org/no-such-composite",
            "--questions",
            str(benchmark_files / "questions.json"),
            "--answers",
            str(benchmark_files / "answers.json"),
            "--output",
            str(tmp_path / "missing"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(
        "error: --model tiny-org/no-such-composite: not a composite folder, and it cannot be loaded from the Hub ("
    )
