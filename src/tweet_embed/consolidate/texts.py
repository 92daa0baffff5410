"""``--keep-text``: the input records read again exactly as ``embed`` read them, joined to the shards by id."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from tweet_embed.consolidate.layout import ConsolidateError


def iter_input_records(
    inputs: Sequence[str],
    id_field: str = "_id",
    text_field: str = "text",
    chunk_lines: int = 50_000,
    text_mode: str = "full",
) -> Iterator[tuple[str, str]]:
    """The valid ``(id, text)`` records of the inputs, in order, read exactly as ``embed`` reads them.

    Same chunk plan, same parser, same input kinds (JSONL plain/.gz/.zst, Parquet files, directories, globs).
    """
    from tweet_embed.embed.chunks import iter_chunk_bytes, make_plan
    from tweet_embed.embed.worker import ChunkOptions, read_block
    from tweet_embed.input.rules import Rules

    plan = make_plan(list(inputs), chunk_lines=chunk_lines)
    # the text mode the shards were embedded with (their metadata): the same text as was embedded
    copts = ChunkOptions(id_field=id_field, text_field=text_field, rules=Rules(text_mode=text_mode))
    chunks = plan.chunks
    i = 0
    while i < len(chunks):  # runs of one kind, in plan order (as the embed run loop reads them)
        parquet = plan.files[chunks[i].file_index].kind == "parquet"
        j = i
        while j < len(chunks) and (plan.files[chunks[j].file_index].kind == "parquet") == parquet:
            j += 1
        if parquet:
            for c in chunks[i:j]:
                b = read_block(plan.files[c.file_index], c, copts)
                yield from zip(b.ids, b.texts, strict=True)
        else:
            for c, data in iter_chunk_bytes(plan, chunks[i:j]):
                b = read_block(plan.files[c.file_index], c, copts, data)
                yield from zip(b.ids, b.texts, strict=True)
        i = j


class TextJoiner:
    """Joins input text back in by id, as a merge: shards are in input order, so one forward pass suffices.

    Rows ``embed`` rejected and later duplicates are simply skipped over in the input.
    """

    def __init__(
        self, inputs: Sequence[str], id_field: str, text_field: str, text_mode: str = "full"
    ) -> None:
        self.inputs = list(inputs)
        self._it = iter_input_records(inputs, id_field, text_field, text_mode=text_mode)

    def texts_for(self, ids: Sequence[str]) -> list[str]:
        out = []
        for want in ids:
            for rid, text in self._it:
                if rid == want:
                    out.append(text)
                    break
            else:
                raise ConsolidateError(
                    f"--keep-text: id {want!r} was not found in the input (after the rows before it); give the "
                    "same input files, in the same order, as to `tweet-embed embed`"
                )
        return out
