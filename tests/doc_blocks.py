"""The README's code blocks that need vLLM: each is preceded by the comment
`<!-- readme-test: skip: needs vLLM; ... -->` (the documentation tests of the main environment skip it; the vLLM
environment's tests run it)."""

import re


_VLLM_BLOCK = re.compile(
    r"<!--\s*readme-test:\s*skip:\s*needs vLLM;[^>]*-->\s*\n"
    r"(?P<fence>`{3,})(?P<language>\w+)[^\n]*\n(?P<code>.*?)^(?P=fence)",
    re.MULTILINE | re.DOTALL,
)


def vllm_blocks(text: str) -> dict[str, str]:
    """Language -> code of the blocks marked as needing vLLM (one per language)."""
    blocks: dict[str, str] = {}
    for match in _VLLM_BLOCK.finditer(text):
        if match.group("language") in blocks:
            raise ValueError(f"Two README blocks in {match.group('language')} are marked as needing vLLM; keep one.")
        blocks[match.group("language")] = match.group("code")
    return blocks
