"""Model cards of the paper's composites (`conversion/recipes/*.yaml`), rendered before any conversion into
`model_cards/paper/`, so that the cards can be read (and reviewed) without downloading 7B checkpoints.

Each card is what `composite-convert` writes for that recipe when the released checkpoints are as published: the
modality table comes from the published token counts and ranks below, everything else from the recipe. Regenerate
after changing a recipe or the card template with `python -m conversion.paper_cards`; a test checks they are
current.
"""

import argparse
from pathlib import Path

from .card import CardInfo, CardSource, render_model_card
from .recipe import Recipe, load_recipe


RECIPES = Path(__file__).resolve().parent / "recipes"
CARDS = Path(__file__).resolve().parent.parent / "model_cards" / "paper"
# Per kind: our encoder's model type and the features the projector makes of one input, as the paper's released
# checkpoints run: CLIP ViT-L/14-336 patches without CLS, LanguageBind's 8 frames x 257 tokens, the audio Q-Former's
# 32 queries over BEATs, PointBERT's 512 groups + CLS.
PAPER_MODALITIES = {
    "image": ("clip_vision_model", 576),
    "audio": ("composite_beats", 32),
    "video": ("composite_languagebind_video", 8 * 257),
    "point": ("composite_point_encoder", 513),
}
# DAMC checkpoints: 5 + 5 learnable tokens around each input and a rank-128 modality LoRA; NaiveMC ones: neither.
DAMC_SIDE_TOKENS, DAMC_RANK = 10, 128
HUB_REPO = "Adu2021/ModelCompose"
# Where this composite's inputs are prepared differently from the paper's code, by kind (the paper's evaluation
# runs in fp16 on every kind; the composite runs in the dtype it is loaded in).
PREPROCESSING_NOTES = {
    "image": "**Images.** The paper pads each image to a square with the mean colour before resizing "
    "(`image_aspect_ratio: pad`); the processor resizes and centre-crops. Pad images yourself (the MCUB harness, "
    "`python -m benchmarks.mcub`, does) to feed exactly what the paper fed.",
    "video": "**Videos.** Frames are sampled as the paper samples them (8, evenly over the clip, both ends included). "
    "The paper's frame transform also flips each clip horizontally at random, even at evaluation; the processor "
    "does not. A still image given as a video is repeated to 8 frames here, where the paper runs it as a "
    "1-frame video (257 tokens).",
    "audio": "**Audio.** 16 kHz mono; the BEATs fbank keeps the first 1024 frames (about 10.24 s) and pads "
    "shorter clips, as the paper's processor does at evaluation.",
    "point": "**Point clouds.** 8192 points of xyz + rgb, colours in [0, 1]. The processor centres each cloud and "
    "scales it into the unit sphere (PointLLM's normalisation, which PointBERT was trained with); the paper's "
    "loader feeds the `.npy` files as they are.",
}
ENCODER_NOTE = (
    "**Encoders.** The recipe names the encoders each source was trained with: `openai/clip-vit-large-patch14-336`, "
    "`LanguageBind/LanguageBind_Video_merge` (Hub), BEATs_iter3_plus_AS2M (`BEATs_iter3_plus_AS2M.pt`, from "
    "microsoft/unilm) and PointLLM's PointBERT (`point_bert_v1.2.pt`); the last two are single files to download "
    "and name by path. Each is ported to this repository's remote code and matches the paper's implementation on "
    "random weights (max abs difference in fp32: BEATs 7.6e-6, PointBERT 3.0e-6, LanguageBind 1.8e-5 at float32 "
    "rounding level, Q-Former 0)."
)


def card_info(recipe: Recipe) -> CardInfo:
    """What `composite-convert` states about the composite of `recipe` when its sources are the released ones."""
    damc = recipe.method == "damc"
    modalities, sources = {}, []
    for source in recipe.sources:
        kind = _kind_of(source.path)
        encoder, tokens = PAPER_MODALITIES[kind]
        modalities[kind] = {
            "kind": kind,
            "encoder": encoder,
            "placeholder": f"<{kind}>",
            "positions_per_item": tokens + (DAMC_SIDE_TOKENS if damc else 0),
            "lora_rank": DAMC_RANK if damc else None,
        }
        sources.append(CardSource(source.path, HUB_REPO, None, "modelcompose", {kind: kind}, 1 / len(recipe.sources)))
    return CardInfo(
        name=recipe.name,
        method=recipe.method,
        rule=recipe.merge.rule,
        density=recipe.merge.density,
        seed=recipe.merge.seed,
        base=CardSource(recipe.base, recipe.base, None, "base", {}, 1.0),
        sources=sources,
        modalities=modalities,
        recipe_yaml=recipe.text,
        license=recipe.license,
        notes=paper_notes(list(modalities)),
    )


def paper_notes(kinds: list[str]) -> list[str]:
    """The card's notes on a composite with modalities of these kinds taken from the paper's checkpoints: its encoders,
    and where the composite's preprocessing differs from the paper's."""
    return [ENCODER_NOTE, *(PREPROCESSING_NOTES[kind] for kind in kinds)] if kinds else []


def _kind_of(path: str) -> str:
    """`image` for `.../multimodal-vicuna-7b-v1.5-vision-damc`, and so on."""
    paper_name = path.rsplit("/", 1)[-1].split("-")[-2]
    kinds = {"vision": "image", "audio": "audio", "video": "video", "point": "point"}
    if paper_name not in kinds:
        raise ValueError(f"{path!r} is not one of the paper's released checkpoints ({HUB_REPO}/multimodal-...).")
    return kinds[paper_name]


def render_cards() -> dict[Path, str]:
    """Card path -> card text, for every recipe."""
    return {
        CARDS / f"{path.stem}.md": str(render_model_card(card_info(load_recipe(path))))
        for path in sorted(RECIPES.glob("*.yaml"))
    }


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description="Rewrite model_cards/paper/ from conversion/recipes/.").parse_args(argv)
    CARDS.mkdir(parents=True, exist_ok=True)
    for path, text in render_cards().items():
        path.write_text(text)


if __name__ == "__main__":
    main()
