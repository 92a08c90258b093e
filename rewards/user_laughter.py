"""user_laughter: does the user laugh in their reply?

Scores: the next user turn. Formula: 1.0 if the reply contains laughter, else 0.0 (no
reply: 0). Jaques et al. 2019 count "ha", "lol" and similar by substring, which fires on
"that", "what" and "have"; here laughter is matched on whole tokens: haha/hehe/hihi and
their variants (hahaha, ahaha, hahah, bahaha, ahah, hah, heh, "ha ha"), lol/lool/lolol,
lmao/lmaooo/lmfao, rofl, xd,
non-English laughter (jaja, jeje, kkkk, 5555, wwww, 哈哈, ㅋㅋ), the emoticons :D and
XD, and laughing emoji (😂🤣😆😹😅😁😄).

>>> from rewards.context import Context
>>> user_laughter([Context("x", next_user="hahaha you got me"), Context("x", next_user="what?")])
[1.0, 0.0]
"""

from __future__ import annotations

import re

from rewards.context import Context

LAUGH_TOKEN = re.compile(
    r"""^(?:
        b?a?(?:h+a+){2,}h*      # haha, hahaha, ahaha, hahah, bahaha
      | a+h+a+h+[ah]*           # ahah, ahahah
      | h+a+h+                  # hah (hah hah: two tokens)
      | h+e+h+                  # heh, hehh
      | (?:h+e+){2,}h*          # hehe
      | (?:h+i+){2,}h*          # hihi
      | l+o+l+(?:o+l+)*z*       # lol, lool, lolol, lolz
      | lmf?a+o+                # lmao, lmaooo, lmfao
      | r+o+f+l+                # rofl
      | x+d+                    # xd, xdd
      | (?:j+a+){2,}j*          # jaja (Spanish)
      | (?:j+e+){2,}j*          # jeje
      | k{4,}                   # kkkk (Portuguese)
      | 5{3,}                   # 555 (Thai)
      | w{3,}                   # www (Japanese)
    )$""",
    re.VERBOSE,
)
LAUGH_ANYWHERE = re.compile(
    r"[😂🤣😆😹😅😁😄]|哈哈|呵呵|ㅋㅋ|ㅎㅎ|(?<![\w:])[:;xX]-?D+(?!\w)"
    r"|(?i:(?<!\w)ha(?:[\s-]+ha)+(?!\w))"  # ha ha, ha-ha ("ha" alone is not laughter)
)
TOKEN = re.compile(r"[^\W_]+", re.UNICODE)


def laughs(text: str | None) -> bool:
    if not text:
        return False
    if LAUGH_ANYWHERE.search(text):
        return True
    return any(LAUGH_TOKEN.match(token) for token in TOKEN.findall(text.lower()))


def user_laughter(contexts: list[Context]) -> list[float]:
    return [1.0 if laughs(c.next_user) else 0.0 for c in contexts]
