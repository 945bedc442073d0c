"""The generator's output format (GopherCite's claim + quote, as plain lines)::

    Answer: <short answer on one line>
    Quote [<k>]: <verbatim span of passage k>

``k`` is the 1-based number of the passage as shown in the prompt. Both answer modes write
this layout; they differ in what the grammars let through (``constraint.py``):

- ``span`` (the default): the answer is a word-aligned span of a shown passage, and the quote,
  written once the answer is known, is a stretch of a passage that contains that answer. Every
  answer stands in its own quote, by construction.
- ``free``: a free-text answer (for large generators that write sentences; by default still a
  span of a passage, ``GenerationConfig.extractive_answer``), then any quote of a passage; the
  reward model judges whether the quote supports the answer.

The prompt (``prompt.py``), the grammars (``constraint.py``) and the parser (``parse.py``) all
derive from these constants.
"""

from typing import Literal, get_args

AnswerMode = Literal["span", "free"]
ANSWER_MODES: tuple[str, ...] = get_args(AnswerMode)

ANSWER_PREFIX = "Answer: "
QUOTE_PREFIX = "Quote ["  # followed by the passage number, then QUOTE_SEPARATOR
QUOTE_SEPARATOR = "]: "
ANSWER_LINE_END = "\n"  # in span mode the answer's grammar ends here and the quote's begins
