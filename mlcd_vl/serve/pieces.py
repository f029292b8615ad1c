"""The text of an answer while it is being generated: settled pieces for streaming, and where the answer ends.

`TextPieces` follows one row token by token; the engine's `TextStream` (one request) and the continuous batcher's
running batch (many rows) both use it, so a streamed answer is cut and shown the same way everywhere. The pieces
concatenate to exactly the final `Result.text`: text that might still become a stop string, or an unfinished UTF-8
character, is held back until it is settled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from mlcd_vl.serve.requests import GenerationSettings, Prompt, Request, Result
from mlcd_vl.serve.stops import find_stop, held_back

if TYPE_CHECKING:
    from mlcd_vl.serve.engine import Engine


class TextPieces:
    """One growing answer: `add` a token, get the newly settled text; `ended` once a stop token or string came.

    With `show=False` (a non-streaming row) the text is only decoded when there are stop strings to look for.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop_ids: Iterable[int], stop_strings: list[str],
                 show: bool = True):
        self.decode, self.stop_ids, self.stop_strings, self.show = decode, set(stop_ids), stop_strings, show
        self.ids: list[int] = []
        self.emitted = ""
        self.ended = False

    def add(self, token: int) -> str:
        self.ids.append(token)
        if token in self.stop_ids:
            self.ended = True
            return ""
        if not (self.show or self.stop_strings):
            return ""
        text = self.decode(self.ids)
        if find_stop(text, self.stop_strings) is not None:
            self.ended = True
            return ""
        if not self.show:
            return ""
        visible = text[:len(text) - held_back(text, self.stop_strings)]
        if len(visible) > len(self.emitted) and visible.startswith(self.emitted):
            piece, self.emitted = visible[len(self.emitted):], visible
            return piece
        return ""

    def rest(self, final_text: str) -> str:
        """What the pieces shown so far still lack of the final answer (held-back text, a last piece)."""
        if not self.show or not final_text.startswith(self.emitted) or len(final_text) <= len(self.emitted):
            return ""
        piece, self.emitted = final_text[len(self.emitted):], final_text
        return piece


class TextStream:
    """Text pieces of one answer as they are generated (the engine's decode loop); `.result` after iteration."""

    def __init__(self, engine: "Engine", request: Request | Prompt, settings: GenerationSettings):
        self.engine, self.request, self.settings = engine, request, settings
        self.result: Result | None = None

    def __iter__(self) -> Iterator[str]:
        engine, settings = self.engine, self.settings
        prompt = self.request if isinstance(self.request, Prompt) else engine.prepare(self.request)
        config = engine.generation_config(settings)
        stop_ids, stop_strings = engine.stop_rules(settings)
        _, mask, embeds = engine._batch([prompt])
        pieces = TextPieces(engine._text, stop_ids, stop_strings)
        with engine._seeded(settings.seed):
            for step in engine._decode(embeds, mask, config, use_cache=settings.use_cache):  # stops checked here
                piece = pieces.add(int(step[0]))
                if pieces.ended:
                    break
                if piece:
                    yield piece
        self.result = engine._finish(prompt, pieces.ids, config, stop_strings)
        if rest := pieces.rest(self.result.text):
            yield rest

    def text(self) -> str:
        """Run to the end and return the whole answer."""
        return "".join(self)
