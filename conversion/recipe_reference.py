"""The recipe reference that `composite-convert --example-recipe` prints: every key a recipe may hold, with what it
does and its default. It is also a valid recipe (tests parse it), and imports nothing, so that printing it is
instant."""

EXAMPLE_RECIPE = """\
# A composite recipe: every key, with its default. Only `base` and `sources` are required.
# Paths: a local folder or file, or a Hub reference `org/name[/sub/folder][@revision]`. A relative path starts from
# the folder of this recipe file (not from where you run the command); a path that does not exist there is taken as a
# Hub reference.

name: vision-video                 # optional; titles the model card (default: the Hub repo name, or "composite")
method: naive                      # naive | damc. damc keeps each modality's own low-rank delta for its tokens and
                                   #   needs sources trained with decoupled parameters (paper checkpoints `*-damc`,
                                   #   or `python -m training --decoupled true`)
                                   #   | routed: each modality's tokens get their own source's whole delta (a LoRA as
                                   #   it is, a full fine-tune as a rank-`rank` SVD), text tokens the merged one
# rank: 256                        # routed only: the rank of every full fine-tune's routed delta (no default; a
                                   #   source's own `rank:` overrides it; refused for LoRA sources)
base: lmsys/vicuna-7b-v1.5         # the base LLM every source was fine-tuned from (its tokenizer is the composite's)
merge:                             # how the sources' text deltas are combined (default: {rule: linear})
  rule: linear                     # linear (mergekit's task_arithmetic; alias: task_arithmetic) | ties | dare_linear
                                   #   | dare_ties
  # density: 0.5                   # ties and dare rules only: the fraction of each delta kept
  # seed: 0                        # dare rules only: seed of the random drop
  # normalize: false               # divide by the weights that contributed (mergekit's; default true for ties,
                                   #   false for linear, dare_linear and dare_ties)
  # lambda: 1.0                    # multiplies the merged delta (mergekit's global lambda)
  # rescale: true                  # ties and dare rules only: scale each trimmed or dropped delta back to its L1 norm
                                   #   (mergekit's; default true for the dare rules, false for ties)
  # int8_mask: false               # accepted for mergekit configs; changes nothing (masks here are always boolean)
dtype: bfloat16                    # float32 | float16 | bfloat16 (default: the base's dtype)
chat_template: default             # default | vicuna_v1 (the paper's, with its system line) | a Jinja template
license: apache-2.0                # optional; the model card's license (a Hub license id)

sources:                           # one entry per source model; a bare string is a `path`
  - path: llava-hf/llava-1.5-7b-hf # required: local folder or Hub reference
    format: llava                  # llava | video_llava | qwen2_audio | modelcompose | peft | composite
                                   #   (default: detected from the files)
    weight: 0.5                    # λ of this source's text delta. Give every source a weight, or none: then each
                                   #   gets 1/N (the paper's default). Not with weight_search.
    modalities: [image]            # take only these of the source's modalities (default: all)
    rename: {image: photo}         # new names for its modalities: names must be unique in a composite
    # rank: 256                    # routed only, full fine-tunes: this source's rank (default: the top-level rank)
  - path: Adu2021/ModelCompose/multimodal-vicuna-7b-v1.5-vision-naivemc
    format: modelcompose
    weight: 0.5
    # The keys below apply to formats that only name their encoder (modelcompose, peft); the others are refused.
    encoder: openai/clip-vit-large-patch14-336  # the encoder the source was trained with (folder, Hub id or file)
    feature_layer: -2              # which encoder layer feeds the projector: an index or `last` (default: what
                                   #   a modelcompose source's config says; -2 for peft)
    feature_select: patch          # patch (drop CLS) | full (default: as feature_layer)
  # A PEFT LoRA source also takes:
  #   projector: mm_projector.bin  # its projector weights (default: non_lora_trainables.bin in the source folder)
  #   kind: image                  # image | video | audio | point: what its encoder reads

# Instead of `weight:` on the sources, choose one λ for all of them on a grid, by how the candidate composites answer
# paper-format questions (the choice and the scores are recorded in the config):
# weight_search:
#   grid: [0.1, 0.25, 0.5]         # the λ candidates
#   objective: agreement           # agreement (needs no answers: agree with each source on its own modalities)
#                                  #   | accuracy (first answer word against the last `gpt` turn)
#   data: val.json                 # the questions (the paper's JSON: conversations + modal_inputs)
#   media_root: media              # folder the media paths inside `data` start from (default: they are used as
#                                  #   written, from the current directory)
#   max_samples: 200               # questions used per candidate (the first ones in `data`)
"""
