"""Evaluation harness for the paper's benchmarks: MCUB-3 / MCUB-4 and AVQA (multiple choice, accuracy on the first
answer letter) and MUSIC-AVQA (open answers, exact match after VQA normalisation), on any composite folder.

    python -m benchmarks.mcub --model FOLDER --questions Q.json --answers A.json --media-root DIR --output DIR

See `run.py` for the command line, `metrics.py` for the scores and `data.py` / `media.py` for the files.
"""

from .metrics import first_letter, forgiving_choice, music_avqa_match, strict_match, summarize, vqa_normalize


__all__ = ["first_letter", "forgiving_choice", "music_avqa_match", "strict_match", "summarize", "vqa_normalize"]
