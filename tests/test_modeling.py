import pytest
import torch
from transformers import (
    AutoConfig,
    GenerationConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LogitsProcessorList,
)

from composition.compose import ModalitySpec, compose
from fixtures.tiny_composite import build_tiny_composite, tiny_image_processor, tiny_tokenizer, tiny_vision_encoder


def test_generation_with_cache_equals_generation_without(composite, batch_all):
    model, _ = composite
    with_cache = model.generate(**batch_all, max_new_tokens=6, do_sample=False, use_cache=True)
    without_cache = model.generate(**batch_all, max_new_tokens=6, do_sample=False, use_cache=False)
    torch.testing.assert_close(with_cache, without_cache, rtol=0, atol=0)


def test_the_cache_may_be_passed_under_either_transformers_name(composite, batch_all):
    """transformers 5.24 renamed `past_key_values` to `cache`; remote code must accept both, and a decode step must
    see the prefill's cache under either name."""
    from transformers import DynamicCache

    from modeling_composite.modeling_composite import CACHE_NAME

    model, _ = composite
    steps = {}
    for name in ("past_key_values", "cache"):
        cache = DynamicCache(config=model.config.get_text_config())
        with torch.no_grad():
            prefill = model(**batch_all, use_cache=True, **{name: cache})
            assert getattr(prefill, CACHE_NAME) is cache and cache.get_seq_length() == batch_all["input_ids"].shape[1]
            next_token = prefill.logits[:, -1:].argmax(-1)
            steps[name] = model(input_ids=next_token, use_cache=True, **{name: cache}).logits
    with torch.no_grad():
        full = model(
            **{
                **batch_all,
                "input_ids": torch.cat([batch_all["input_ids"], next_token], dim=1),
                "attention_mask": torch.ones(1, batch_all["input_ids"].shape[1] + 1, dtype=torch.long),
            }
        ).logits
    torch.testing.assert_close(steps["cache"], steps["past_key_values"], rtol=0, atol=0)
    torch.testing.assert_close(steps["cache"][:, -1], full[:, -1], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="once"):
        model(**batch_all, past_key_values=DynamicCache(), cache=DynamicCache())


def test_a_placeholder_generated_while_decoding_is_read_as_text(composite, batch_all):
    """A decode step has no modality inputs, so a placeholder id the model itself produced is a text token: it gives
    the logits of a text token whose embedding is the placeholder's (the routed deltas would differ otherwise)."""
    import copy

    from transformers import DynamicCache

    model, _ = composite
    placeholder = model.config.modalities["image"].placeholder_id
    text_twin = copy.deepcopy(model)
    used = set(batch_all["input_ids"].flatten().tolist())
    stand_in = next(token for token in range(4, placeholder) if token not in used)  # a byte the prompt lacks
    with torch.no_grad():
        embeddings = text_twin.get_input_embeddings().weight
        embeddings[stand_in] = embeddings[placeholder]
    steps = []
    for candidate, token in ((model, placeholder), (text_twin, stand_in)):
        cache = DynamicCache(config=candidate.config.get_text_config())
        with torch.no_grad():
            candidate(**batch_all, use_cache=True, past_key_values=cache)
            steps.append(candidate(input_ids=torch.tensor([[token]]), use_cache=True, past_key_values=cache).logits)
    torch.testing.assert_close(steps[0], steps[1], rtol=0, atol=0)


def test_left_padded_batch_equals_rows_alone(composite, raw_inputs):
    model, processor = composite
    prompts = [
        "USER: <image> <audio> hi? ASSISTANT:",
        "USER: tell me about <point> please, at some length. ASSISTANT:",
    ]
    inputs = [
        {"images": [raw_inputs["image"]], "audio": [raw_inputs["audio"]]},
        {"point_clouds": [raw_inputs["point"]]},
    ]
    batch = processor(
        text=prompts,
        images=[raw_inputs["image"]],
        audio=[raw_inputs["audio"]],
        point_clouds=[raw_inputs["point"]],
        padding=True,
    )
    assert (batch["attention_mask"] == 0).any(), "the test needs a padded row"
    together = model.generate(**batch, max_new_tokens=5, do_sample=False)[:, -5:]
    for row, (prompt, row_inputs) in enumerate(zip(prompts, inputs)):
        alone = model.generate(**processor(text=prompt, **row_inputs), max_new_tokens=5, do_sample=False)[:, -5:]
        torch.testing.assert_close(together[row : row + 1], alone, rtol=0, atol=0)


def test_only_the_encoders_of_modalities_in_the_batch_run(composite, raw_inputs):
    """Unlike the reference (which runs every encoder on dummy inputs), an image-and-audio prompt runs two of the four
    encoders, once each for the prefill and never while decoding; a text-only prompt runs none."""
    model, processor = composite
    calls = dict.fromkeys(model.model.encoders, 0)
    hooks = [
        encoder.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
        for name, encoder in model.model.encoders.items()
    ]
    try:
        batch = processor(
            text="USER: <image> <audio> hi? ASSISTANT:", images=[raw_inputs["image"]], audio=[raw_inputs["audio"]]
        )
        model.generate(**batch, max_new_tokens=3, do_sample=False)
        assert calls == {"image": 1, "video": 0, "audio": 1, "point": 0}
        model.generate(**processor(text="USER: hello there ASSISTANT:"), max_new_tokens=3, do_sample=False)
        assert calls == {"image": 1, "video": 0, "audio": 1, "point": 0}
    finally:
        for hook in hooks:
            hook.remove()


def test_text_only_prompt_on_a_composite_with_encoders(composite):
    model, processor = composite
    batch = processor(text="USER: hello there ASSISTANT:")
    assert set(batch) == {"input_ids", "attention_mask"}
    output = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert output.shape == (1, batch["input_ids"].shape[1] + 4)


def test_placeholder_count_mismatch_names_the_modality_and_numbers(composite, batch_all):
    model, _ = composite
    ids = batch_all["input_ids"].clone()
    image_id = model.config.modalities["image"].placeholder_id
    ids[0, (ids[0] == image_id).nonzero()[0]] = 70  # one image position fewer than the image needs
    with pytest.raises(ValueError, match=r"Modality 'image': the prompt has 18 placeholder positions .* need 19"):
        model(**{**batch_all, "input_ids": ids})


def test_placeholders_without_inputs_are_refused(composite, batch_all):
    model, _ = composite
    with pytest.raises(ValueError, match="Modality 'audio': the prompt has 28 audio placeholder positions but no"):
        model(**{key: value for key, value in batch_all.items() if key != "input_features"})


def test_input_for_a_modality_the_composite_lacks_is_refused(batch_all):
    model, _ = build_tiny_composite(kinds=("image",))
    with pytest.raises(ValueError, match="no audio modality"):
        model(input_ids=torch.tensor([[1, 70]]), input_features=batch_all["input_features"])


def test_malformed_modality_tensor_is_refused(composite, batch_all):
    model, _ = composite
    message = r"Modality 'point' \(point\) takes a non-empty tensor \(items, points, values per point\)"
    with pytest.raises(ValueError, match=message):
        model(**{**batch_all, "point_clouds": batch_all["point_clouds"][0]})


def test_prompt_longer_than_the_model_allows_is_refused(composite):
    model, _ = composite
    limit = model.config.get_text_config().max_position_embeddings
    with pytest.raises(ValueError, match=f"The sequence is {limit + 1} positions .* allows {limit}"):
        model(input_ids=torch.full((1, limit + 1), 70))


def _llava_and_its_composite():
    """A random `LlavaForConditionalGeneration` and the composite of its parts (tower, projector, LLM)."""
    tokenizer = tiny_tokenizer()
    image_token_id = len(tokenizer)  # where the composite's builder puts `<image>`
    text_config = AutoConfig.for_model(
        "llama",
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(
        LlavaConfig(
            vision_config=tiny_vision_encoder().config.to_dict(),
            text_config=text_config.to_dict(),
            image_token_index=image_token_id,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
    ).eval()
    llm = LlamaForCausalLM(text_config).eval()
    llm.model.load_state_dict(llava.model.language_model.state_dict())
    llm.lm_head.load_state_dict(llava.lm_head.state_dict())
    model, processor = compose(
        llm,
        tokenizer,
        {
            "image": ModalitySpec(
                kind="image",
                encoder=llava.model.vision_tower,
                feature_layer=-2,
                feature_select="patch",
                projector_state_dict=llava.model.multi_modal_projector.state_dict(),
            )
        },
        image_processor=tiny_image_processor(),
    )
    assert model.config.modalities["image"].placeholder_id == image_token_id
    return llava, model, processor


def test_single_llava_source_reproduces_transformers_llava():
    """A composite of one LLaVA's parts (tower, projector, LLM) equals `LlavaForConditionalGeneration`."""
    llava, model, processor = _llava_and_its_composite()
    from PIL import Image

    image = Image.new("RGB", (40, 36), color=(200, 30, 90))
    batch = processor(text="USER: <image> What is shown? ASSISTANT:", images=[image])
    with torch.no_grad():
        expected = llava(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
        torch.testing.assert_close(model(**batch).logits, expected, rtol=1e-5, atol=1e-5)
    ours = model.generate(**batch, max_new_tokens=6, do_sample=False)
    theirs = llava.generate(
        input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], max_new_tokens=6, do_sample=False
    )
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_left_padded_batch_generates_what_transformers_llava_generates():
    """Batched greedy generation over prompts of different lengths (left padding) gives LLaVA's tokens row for row;
    `benchmarks.generate_throughput` compares the speed of exactly this."""
    llava, model, processor = _llava_and_its_composite()
    from PIL import Image

    images = [Image.new("RGB", (40, 36), color=(200, 30, 90)), Image.new("RGB", (32, 48), color=(10, 220, 40))]
    texts = ["USER: <image> What? ASSISTANT:", "USER: <image> What is shown in this picture, in detail? ASSISTANT:"]
    batch = processor(text=texts, images=images, padding=True, return_tensors="pt")
    assert (batch["attention_mask"][0] == 0).any() and batch["attention_mask"][:, -1].all()  # left-padded
    settings = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": 3}
    ours = model.generate(**batch, **settings)
    theirs = llava.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        **settings,
    )
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # The short row's tokens do not depend on the long one: generating it alone gives the same new tokens.
    alone = processor(text=texts[:1], images=images[:1], return_tensors="pt")
    row = model.generate(**alone, **settings)
    torch.testing.assert_close(ours[0, -6:], row[0, -6:], rtol=0, atol=0)


def test_qwen2_text_model_with_tied_embeddings_round_trips(tmp_path, raw_inputs):
    model, processor = build_tiny_composite(kinds=("image", "audio"), text_model_type="qwen2")
    batch = processor(text="<image> <audio> hi", images=[raw_inputs["image"]], audio=[raw_inputs["audio"]])
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_no_split_modules_cover_decoder_and_encoder_layers(composite):
    model, _ = composite
    assert {"LlamaDecoderLayer", "CLIPEncoderLayer", "Qwen2AudioEncoderLayer", "PointBlock"} <= set(
        model._no_split_modules
    )


def test_beam_search_gives_every_beam_its_own_prompts_inputs_in_order(composite, raw_inputs):
    """Beams of a prompt with two images see both, in order ([a, b] -> [a, b, a, b], not [a, a, b, b]), also when
    the prompts of a batch hold different numbers of images: each beam's first logits are its prompt's own."""
    import numpy as np
    from PIL import Image

    model, processor = composite
    other = Image.fromarray(np.random.default_rng(5).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    batch = processor(
        text=["USER: <image> and <image> differ how? ASSISTANT:", "USER: what is <image>? ASSISTANT:"],
        images=[raw_inputs["image"], other, other],
        padding=True,
    )
    with torch.no_grad():
        expected = model(**batch).logits[:, -1]
        beams = model.generate(
            **batch,
            max_new_tokens=2,
            num_beams=2,
            num_return_sequences=2,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        ).logits[0]
    torch.testing.assert_close(beams, expected.repeat_interleave(2, dim=0), rtol=1e-4, atol=1e-4)


def test_the_text_model_called_alone_after_a_multimodal_forward_is_plain(composite, batch_all):
    model, _ = composite
    text = torch.tensor([[1, 70, 71, 72, 73]])
    decoder = model.get_decoder()
    with torch.no_grad():
        before = decoder(input_ids=text).last_hidden_state
        model(**batch_all)
        after = decoder(input_ids=text).last_hidden_state
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_generate_from_inputs_embeds_equals_generate_from_input_ids(composite):
    model, _ = composite
    text = torch.tensor([[1, 70, 71, 72, 73, 74]])
    from_ids = model.generate(input_ids=text, max_new_tokens=4, do_sample=False)[:, text.shape[1] :]
    embeds = model.get_input_embeddings()(text)
    from_embeds = model.generate(inputs_embeds=embeds, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(from_embeds, from_ids, rtol=0, atol=0)


def test_return_dict_false_gives_tuples(composite, batch_all):
    model, _ = composite
    with torch.no_grad():
        as_dict = model(**batch_all)
        as_tuple = model(**batch_all, return_dict=False)
        inner = model.model(**batch_all, return_dict=False)
    assert isinstance(as_tuple, tuple) and isinstance(inner, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.logits, rtol=0, atol=0)


def test_generation_that_would_run_past_max_position_embeddings_is_refused_before_it_starts(composite):
    """The prompt is checked in forward; generate() also refuses to decode past the text model's positions (the
    composite's config has no top-level max_position_embeddings, so transformers' own warning never fires for it).
    Up to the limit works."""
    model, _ = composite
    limit = model.config.get_text_config().max_position_embeddings
    prompt = torch.full((1, limit - 2), 70)
    with pytest.raises(
        ValueError,
        match=rf"would run to {limit + 2} positions \({limit - 2} in the prompt \+ 4 new\) "
        rf"but the text model has {limit} .* at most 2 new tokens",
    ):
        model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False)
    with pytest.raises(ValueError, match=rf"would run to {limit + 1} positions \(max_length\)"):
        model.generate(input_ids=prompt, max_length=limit + 1, do_sample=False)
    output = model.generate(input_ids=prompt, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert output.shape[1] == limit


def test_chunked_prefill_that_would_split_point_clouds_is_refused(composite, raw_inputs):
    """transformers refuses a chunked prefill for `pixel_values` and the like; point clouds (our input) get the same
    clear refusal rather than a placeholder count error from the first chunk. A chunk as long as the prompt works."""
    model, processor = composite
    batch = processor(text="USER: <point> what shape is it? ASSISTANT:", point_clouds=[raw_inputs["point"]])
    prompt_length = batch["input_ids"].shape[1]
    with pytest.raises(ValueError, match=r"prefill_chunk_size=8\) cannot split \['point_clouds'\]"):
        model.generate(**batch, max_new_tokens=2, do_sample=False, prefill_chunk_size=8)
    # The same with generate()'s leading parameters passed by position, as it allows (prompt, config, processors).
    by_position = GenerationConfig(max_new_tokens=2, do_sample=False, prefill_chunk_size=8)
    rest = {key: value for key, value in batch.items() if key != "input_ids"}
    with pytest.raises(ValueError, match=r"prefill_chunk_size=8\) cannot split"):
        model.generate(batch["input_ids"], by_position, LogitsProcessorList(), **rest)
    whole = model.generate(**batch, max_new_tokens=3, do_sample=False)
    one_chunk = model.generate(**batch, max_new_tokens=3, do_sample=False, prefill_chunk_size=prompt_length)
    torch.testing.assert_close(one_chunk, whole, rtol=0, atol=0)


def test_static_cache_and_compiled_decoding_generate_what_eager_generates(composite, batch_all):
    """`cache_implementation="static"` makes generate() compile the decode step (CUDA graphs on a GPU): the whole
    forward of a decode step must trace as one graph (a decoded token is text: the routed projections are their base
    layers) and give eager's tokens. The `aot_eager` backend traces exactly what inductor would compile, without its
    C++ build."""
    import copy

    import torch._dynamo
    from transformers import CompileConfig

    model = copy.deepcopy(composite[0])
    greedy = {"max_new_tokens": 6, "do_sample": False}
    eager = model.generate(**batch_all, **greedy)
    config = CompileConfig(fullgraph=True, dynamic=False, backend="aot_eager", mode=None)
    config._compile_all_devices = True  # transformers compiles only on accelerators unless told otherwise
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = model.generate(**batch_all, **greedy, cache_implementation="static", compile_config=config)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    assert not torch._dynamo.utils.counters["graph_break"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_llm_receives_bitwise_what_transformers_llava_gives_its_llm(dtype):
    """For the same left-padded batch, the composite of a LLaVA's parts calls its LLM with exactly the arguments
    `LlavaForConditionalGeneration` calls its own with, at the prefill and at every decode step: the embeddings
    (image features spliced in), attention mask, position ids, cache and flags. So any difference between the two
    models' tokens comes from inside the LLM, never from the composite's plumbing."""
    from PIL import Image

    llava, model, processor = _llava_and_its_composite()
    llava.to(dtype)
    model.to(dtype)
    images = [Image.new("RGB", (40, 36), color=(200, 30, 90)), Image.new("RGB", (32, 48), color=(10, 220, 40))]
    texts = ["USER: <image> What? ASSISTANT:", "USER: <image> What is shown in this picture, in detail? ASSISTANT:"]
    batch = processor(text=texts, images=images, padding=True, return_tensors="pt")
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    calls = {"ours": [], "llava": []}

    def capture(label):
        return lambda module, args, kwargs: calls[label].append((args, dict(kwargs)))

    hooks = [
        model.model.language_model.register_forward_pre_hook(capture("ours"), with_kwargs=True),
        llava.model.language_model.register_forward_pre_hook(capture("llava"), with_kwargs=True),
    ]
    settings = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False, "pad_token_id": 3}
    try:
        ours = model.generate(**batch, **settings)
        theirs = llava.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            **settings,
        )
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert len(calls["ours"]) == len(calls["llava"]) == 3
    for (our_args, our_kwargs), (their_args, their_kwargs) in zip(calls["ours"], calls["llava"]):
        assert our_args == their_args == ()
        assert our_kwargs.keys() == their_kwargs.keys()
        for key, value in our_kwargs.items():
            other = their_kwargs[key]
            if torch.is_tensor(value):
                assert value.dtype == other.dtype and torch.equal(value, other), key
            elif key in ("cache", "past_key_values"):
                assert type(value) is type(other) and value.get_seq_length() == other.get_seq_length()
            else:
                assert value == other, key
