"""The generator's output format (GopherCite's claim + quote, as plain lines).

    Answer: <short answer on one line>
    Quote [<k>]: <verbatim span of passage k>

``k`` is the 1-based number of the passage as shown in the prompt. The grammar in
``constraint.py`` and the parser in ``parse.py`` both derive from these constants.
"""

ANSWER_PREFIX = "Answer: "
QUOTE_PREFIX = "Quote ["  # followed by the passage number, then QUOTE_SEPARATOR
QUOTE_SEPARATOR = "]: "
