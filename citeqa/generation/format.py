"""The generator's output format (GopherCite's claim + quote, as plain lines), in two modes.

``span`` (the default): the quote first, then the answer, a word-aligned span OF THAT QUOTE::

    Quote [<k>]: <verbatim span of passage k>
    Answer: <words of the quote>

``free``: a free-text answer (for large generators that write sentences), then the quote; the
reward model judges whether the quote supports it::

    Answer: <short answer on one line>
    Quote [<k>]: <verbatim span of passage k>

``k`` is the 1-based number of the passage as shown in the prompt. The prompt
(``prompt.py``), the grammars (``constraint.py``) and the parser (``parse.py``) all derive
from these constants.
"""

from typing import Literal

AnswerMode = Literal["span", "free"]
ANSWER_MODES: tuple[str, ...] = ("span", "free")

ANSWER_PREFIX = "Answer: "
QUOTE_PREFIX = "Quote ["  # followed by the passage number, then QUOTE_SEPARATOR
QUOTE_SEPARATOR = "]: "
# In span mode the first grammar ends here; the answer's grammar (built from the quote) then
# starts with the space, so a token such as " Paris" may span the two.
ANSWER_LINE_START = "\n" + ANSWER_PREFIX.rstrip()
