"""Serving composites with vLLM (the `serving` plugin): greedy tokens equal transformers' `generate` on the same
folder, for every modality, mixes and text only, in one batch, compiled and eager, DAMC and NaiveMC.

Runs in the vLLM environment of `make test` (`.venv-vllm`); skipped where vLLM is not installed. Each engine starts
once, in a process of its own, and answers every request of its model: DAMC eager and NaiveMC eager (offline `LLM`,
every modality including point clouds and a second image modality by name), DAMC compiled (the README's OpenAI
server as written, vLLM's default compilation, with its client and the server's image, audio and video content
types). Compilation is the slow start (about a minute on 2 cores), so one engine compiles."""

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from doc_snippets import code_blocks
from vllm_support import MAX_NEW_TOKENS, build_servable_composite, requests


pytest.importorskip("vllm", reason="vLLM is not installed here (`make test` runs this file in .venv-vllm)")

from transformers import AutoModelForCausalLM, AutoProcessor  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]
ENGINE_TIMEOUT = 600


def _engine_environment() -> dict:
    environment = dict(os.environ)
    environment.update(HF_HUB_OFFLINE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONPATH=str(ROOT))
    return environment


def _run_engine(folder: Path, mode: str) -> list[dict]:
    output = folder.parent / f"{folder.name}-{mode}.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "vllm_support.py"), str(folder), str(output), mode],
        env=_engine_environment(),
        capture_output=True,
        text=True,
        timeout=ENGINE_TIMEOUT,
    )
    if result.returncode != 0:
        pytest.fail(f"the vLLM engine ({mode}) failed:\n{result.stderr[-6000:]}")
    return json.loads(output.read_text())


def _transformers_answers(folder: Path, prompts: list[tuple[str, dict]], **generate_kwargs) -> list[dict]:
    """Greedy answers of `generate()`, with each step's chosen-token log-probability and its lead over the
    runner-up."""
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    answers = []
    for prompt, inputs in prompts:
        batch = processor(text=prompt, **inputs)
        with torch.no_grad():
            generated = model.generate(
                **batch,
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                **generate_kwargs,
            )
        prompt_ids = batch["input_ids"][0].tolist()
        steps = [scores[0].log_softmax(-1).topk(2).values.tolist() for scores in generated.scores]
        answers.append(
            {
                "prompt_ids": prompt_ids,
                "tokens": generated.sequences[0, len(prompt_ids) :].tolist(),
                "logprobs": [first for first, _ in steps],
                "leads": [first - second for first, second in steps],
            }
        )
    return answers


# vLLM's CPU kernels (oneDNN GEMMs, its attention, Inductor's fusions when compiled) round differently from torch's:
# log-probabilities differ by up to ~1.3e-2 on the tiny composites (~1e-3 on text-only prompts eager), while DAMC's
# routing moves the chosen tokens' by up to ~0.17 and changes most answers (`test_references_are_discriminative`).
# Greedy choices between tokens closer than the rounding can go either way in any two engines.
LOGPROB_TOLERANCE = 3e-2


def assert_same_greedy_answers(served: list[dict], expected: list[dict]) -> None:
    """vLLM's answers are transformers' token for token, with log-probabilities within the kernels' rounding; an
    answer may part from transformers' only at a step where transformers' two best tokens are a near tie (and is
    compared up to there). Most answers must match whole, so that the comparison cannot pass vacuously."""
    assert [answer["prompt_ids"] for answer in served] == [answer["prompt_ids"] for answer in expected]
    whole = 0
    for index, (got, want) in enumerate(zip(served, expected)):
        for step, (token, wanted) in enumerate(zip(got["tokens"], want["tokens"])):
            assert abs(got["logprobs"][step] - want["logprobs"][step]) < LOGPROB_TOLERANCE, (index, step)
            if token != wanted:
                assert want["leads"][step] < 2 * LOGPROB_TOLERANCE, (index, step, got["tokens"], want["tokens"])
                break
        else:
            assert len(got["tokens"]) == len(want["tokens"]), (index, got["tokens"], want["tokens"])
            whole += 1
    assert whole >= 0.75 * len(expected), f"only {whole} of {len(expected)} answers match whole"


@pytest.fixture(scope="module")
def composites(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm-composites")
    return {method: build_servable_composite(root / method, method) for method in ("damc", "naive")}


@pytest.fixture(scope="module")
def offline_prompts() -> list[tuple[str, dict]]:
    return [(request["prompt"], request["hf"]) for request in requests()]


@pytest.mark.parametrize("method, mode", [("damc", "eager"), ("naive", "eager")])
def test_offline_batch_equals_transformers(composites, offline_prompts, method, mode):
    """Every modality alone (two image modalities by name, point clouds), mixes and text only, in one batch."""
    served = _run_engine(composites[method], mode)
    assert_same_greedy_answers(served, _transformers_answers(composites[method], offline_prompts))


def test_references_are_discriminative(composites, offline_prompts):
    """The comparisons above can fail: DAMC's routing changes the answers of modality requests, and without
    suppression the composites would answer with placeholder tokens (which vLLM must mask itself)."""
    folder = composites["damc"]
    routed = _transformers_answers(folder, offline_prompts)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        for layer in model.model.routed_layers():
            layer.lora_B.weight.zero_()  # every row through W_text: no routing
    unrouted_folder = folder.parent / "damc-unrouted"
    shutil.copytree(folder, unrouted_folder)
    model.save_pretrained(unrouted_folder)
    unrouted = _transformers_answers(unrouted_folder, offline_prompts)
    differing = [index for index, (a, b) in enumerate(zip(routed, unrouted)) if a["tokens"] != b["tokens"]]
    assert len(differing) >= 3, differing
    shifts = [abs(a["logprobs"][0] - b["logprobs"][0]) for a, b in zip(routed, unrouted) if a["tokens"] != b["tokens"]]
    assert max(shifts) > 3 * LOGPROB_TOLERANCE, shifts

    placeholder_ids = {entry.placeholder_id for entry in model.config.modalities.values()}
    unsuppressed = _transformers_answers(composites["naive"], offline_prompts, suppress_tokens=[])
    assert any(placeholder_ids & set(answer["tokens"]) for answer in unsuppressed)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_server(port: int, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + ENGINE_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the vLLM server exited ({server.returncode}):\n{log.read_text()[-6000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            time.sleep(2)
    pytest.fail("the vLLM server did not start in time")


def _data_url(mime: str, payload: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode()}"


def test_readme_server_and_client(composites, tmp_path):
    """The README's serving example as written (`my-composite` is the tiny DAMC composite, port made free), then
    the server's content types (image_url, input_audio, video_url) against transformers on the chat-rendered prompt."""
    from PIL import Image
    import cv2
    import soundfile

    # The blocks the documentation tests of the main environment skip as needing vLLM: the command and the client.
    blocks = [
        block for block in code_blocks((ROOT / "README.md").read_text()) if (block.skip or "").startswith("needs vLLM")
    ]
    (command,) = [block.code for block in blocks if block.language == "bash"]
    (client,) = [block.code for block in blocks if block.language == "python"]
    shutil.copytree(composites["damc"], tmp_path / "my-composite")
    port = _free_port()
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "photo.png")
    environment = {**_engine_environment(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    log = tmp_path / "server.log"
    with open(log, "w") as log_file:
        server = subprocess.Popen(
            ["bash", "-c", command.replace("8000", str(port))],
            cwd=tmp_path,
            env=environment,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_for_server(port, server, log)
        printed = subprocess.run(
            [sys.executable, "-c", client.replace("8000", str(port))],
            cwd=tmp_path,
            env=environment,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert printed.returncode == 0, printed.stderr[-4000:]

        # The server's other content types: audio (a WAV), a video (an mp4, decoded by vLLM with OpenCV, which the
        # reference decodes the same way), a mix, and the README's image.
        audio = (rng.standard_normal(12000) * 0.1).astype(np.float32)
        wav = io.BytesIO()
        soundfile.write(wav, audio, 16000, format="WAV", subtype="FLOAT")
        video_path = tmp_path / "clip.mp4"
        writer = cv2.VideoWriter(str(video_path), cv2.VideoWriter_fourcc(*"mp4v"), 4, (32, 32))
        for _ in range(4):
            writer.write(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
        writer.release()
        capture, frames = cv2.VideoCapture(str(video_path)), []
        while (frame := capture.read())[0]:
            frames.append(cv2.cvtColor(frame[1], cv2.COLOR_BGR2RGB))
        image_url = _data_url("image/png", (tmp_path / "photo.png").read_bytes())
        image_item = {"type": "image_url", "image_url": {"url": image_url}}
        wav_data = base64.b64encode(wav.getvalue()).decode()
        audio_item = {"type": "input_audio", "input_audio": {"data": wav_data, "format": "wav"}}
        video_item = {"type": "video_url", "video_url": {"url": _data_url("video/mp4", video_path.read_bytes())}}
        chats = [
            ([audio_item], {"audio": [audio]}),
            ([video_item], {"videos": [np.stack(frames)]}),
            (
                [image_item, audio_item, video_item],
                {"images": [image], "audio": [audio], "videos": [np.stack(frames)]},
            ),
            ([image_item], {"images": [image]}),
        ]
        served = []
        for content, _ in chats:
            messages = [{"role": "user", "content": [*content, {"type": "text", "text": "What is it?"}]}]
            body = json.dumps(
                {
                    "model": "my-composite",
                    "messages": messages,
                    "max_tokens": MAX_NEW_TOKENS,
                    "temperature": 0,
                    "return_token_ids": True,
                    "logprobs": True,
                }
            ).encode()
            call = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/chat/completions", body, {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(call, timeout=120) as response:
                reply = json.load(response)
            choice = reply["choices"][0]
            served.append(
                {
                    "prompt_ids": reply["prompt_token_ids"],
                    "tokens": choice["token_ids"],
                    "logprobs": [step["logprob"] for step in choice["logprobs"]["content"]],
                    "text": choice["message"]["content"],
                }
            )
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the shell and the server it started
        server.wait(timeout=60)

    processor = AutoProcessor.from_pretrained(composites["damc"], trust_remote_code=True)
    prompts = []
    for content, inputs in chats:
        kind_of = {"image_url": "image", "input_audio": "audio", "video_url": "video"}
        items = [*({"type": kind_of[item["type"]]} for item in content), {"type": "text", "text": "What is it?"}]
        messages = [{"role": "user", "content": items}]
        prompts.append((processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), inputs))
    assert_same_greedy_answers(served, _transformers_answers(composites["damc"], prompts))
    # The README's client prints the server's answer to the README's image question.
    assert printed.stdout.strip() == served[-1]["text"].strip()
