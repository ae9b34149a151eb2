"""What counts as a Chinese (Han) character: the one definition for cleaning's Chinese ratio, the idiom reader and
the idiom and pinyin tasks. A module of its own, importing nothing, so that the task registry does not load the
cleaning pipeline's dependencies (datasketch, and scipy under it) to read one character class."""

import re

# CJK Unified Ideographs and Extension A (the rarer characters, 㐀 onward)
HAN_CHARACTER = r"[\u3400-\u4dbf\u4e00-\u9fff]"
HAN_WORD = re.compile(HAN_CHARACTER + "+")  # a word of Han characters only (with fullmatch)
