"""The paper-format conversation data (LLaVA's JSON: `conversations` turns with `modal_inputs`) and the media its
samples name: what the trainer trains on and the converter's λ search asks (`data`, `media`)."""
