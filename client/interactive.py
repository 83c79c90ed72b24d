"""`rnnserve-client interactive`: the model's next-token guesses, redrawn as you type.

On a terminal every key is one step of one session (the server keeps the state, so a key costs
one token of work however long the text). The terminal is put in cbreak mode (keys arrive
at once, unechoed, Ctrl-C still interrupts) and always restored. A recurrent state cannot
be un-stepped, so Backspace opens a fresh session with the shortened text as its prompt.
Without a terminal (piped input, or --json) each line is fed as typed text and the predictions
after it are printed: the same loop, easy to script and test.
"""

from __future__ import annotations

import shutil
import signal
import sys
import termios
import tty
import unicodedata
from typing import TextIO

from rnnserve.client import render
from rnnserve.client.errors import SessionNotFound
from rnnserve.client.sync import Client, Session
from rnnserve.client.types import Prediction

_QUIT = {"", "\x04"}  # end of input, Ctrl-D
_BACKSPACE = {"\x7f", "\b"}
_SHOWN_AS = {"\n": "⏎", "\t": "⇥"}  # keep the redrawn line on one terminal line


class _Typed:
    """The text typed so far and a session that has consumed exactly that text."""

    def __init__(self, client: Client, top_k: int, model: str | None, model_version: str | None):
        self._client, self._top_k, self._model, self._model_version = client, top_k, model, model_version
        self.text = ""
        self.prediction: Prediction | None = None
        self._session: Session = client.session(model=model, model_version=model_version)

    def type(self, text: str) -> None:
        self.text += text
        try:
            self.prediction = self._session.step(text, top_k=self._top_k)
        except SessionNotFound:  # expired while the user paused: carry on in a new one
            self._reopen()

    def erase(self) -> None:
        self.text = self.text[:-1]
        self._session.close()
        self._reopen()

    def _reopen(self) -> None:
        self._session = self._client.session(self.text or None, model=self._model, model_version=self._model_version,
                                             top_k=self._top_k)
        self.prediction = self._session.prediction

    def close(self) -> None:
        self._session.close()


def run(client: Client, *, top_k: int, model: str | None, json_lines: bool, model_version: str | None = None,
        stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    typed = _Typed(client, top_k, model, model_version)
    try:
        if stdin.isatty() and not json_lines:
            _keys(typed, stdin, stdout)
        else:
            _lines(typed, stdin, stdout, json_lines)
    except KeyboardInterrupt:
        pass  # Ctrl-C is the way out, not a failure
    finally:
        typed.close()


def _keys(typed: _Typed, stdin: TextIO, stdout: TextIO) -> None:
    saved = termios.tcgetattr(stdin)
    # Ctrl-C quits, as the banner says, even when SIGINT came ignored from whoever started us (a
    # background job, nohup): Python then installs no KeyboardInterrupt of its own.
    interrupt = signal.signal(signal.SIGINT, signal.default_int_handler)
    tty.setcbreak(stdin)
    try:
        stdout.write("Type to see the next-token predictions. Backspace erases; Ctrl-D or Ctrl-C quits.\n")
        stdout.flush()
        while (key := stdin.read(1)) not in _QUIT:
            key = "\n" if key == "\r" else key
            if key in _BACKSPACE:
                typed.erase()
            elif key in _SHOWN_AS or not unicodedata.category(key).startswith("C"):
                typed.type(key)
            else:
                continue  # other control keys (arrows send ESC sequences) mean nothing here
            _redraw(typed, stdout)
    finally:
        termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        signal.signal(signal.SIGINT, interrupt)
        stdout.write("\n")


def _redraw(typed: _Typed, stdout: TextIO) -> None:
    guesses = "  →  " + render.prediction_inline(typed.prediction) if typed.prediction else ""
    room = max(shutil.get_terminal_size().columns - len(guesses) - 1, 10)
    shown = "".join(_SHOWN_AS.get(ch, ch) for ch in typed.text)[-room:]
    stdout.write(f"\r\x1b[K{shown}{guesses}")
    stdout.flush()


def _lines(typed: _Typed, stdin: TextIO, stdout: TextIO, json_lines: bool) -> None:
    for line in stdin:
        # A line's break is fed before the next line, so predictions follow each line's last character.
        text = ("\n" if typed.text else "") + line.rstrip("\r\n")
        if not text:
            continue
        typed.type(text)
        if json_lines:
            stdout.write(render.as_json(typed.prediction) + "\n")
        else:
            stdout.write(f"{typed.text[-40:]!r}  →  {render.prediction_inline(typed.prediction)}\n")
        stdout.flush()
