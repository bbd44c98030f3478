"""Which stages a change makes stale. The identities that the stages after a stage read (pipeline/runfolder.py)."""

from __future__ import annotations

from pipeline.runfolder import Stage, read_json, stage_fingerprint

# ------------------------------------------------------------------------------------ identities (runfolder)


def test_a_part_keeps_its_identity_while_another_part_or_a_local_input_changes(tmp_path):
    """Parts: each has an identity made from its own inputs; a rerun for another part, or for a ``local`` input,
    leaves it (and, for a local input, the stage's identity) as it was; a redo gives every identity a new token."""
    def run(parts: dict[str, str], local: str = "link", fresh: bool = False, finish: bool = True) -> dict:
        stage = Stage(tmp_path, "a", "fp", parts, local)
        assert not stage.is_done() or fresh
        stage.begin(fresh=fresh)
        if finish:
            stage.finish()
        return {"a": stage_fingerprint(tmp_path, "a"), **{p: stage_fingerprint(tmp_path, "a", p) for p in parts}}

    first = run({"p": "1", "q": "2"})
    assert (first["p"], first["q"]) == ("1", "2") and "." not in first["a"]
    assert stage_fingerprint(tmp_path, "a", "other") == first["a"]  # a part it does not record: the whole
    copied = run({"p": "1", "q": "2"}, local="copy")
    assert copied == first  # a local input: the same identities
    q_changed = run({"p": "1", "q": "3"}, local="copy")
    assert q_changed["p"] == "1" and q_changed["q"] == "3" and q_changed["a"] != first["a"]
    redone = run({"p": "1", "q": "3"}, local="copy", fresh=True)
    token = redone["a"].split(".")[1]
    assert redone == {"a": f"{q_changed['a']}.{token}", "p": f"1.{token}", "q": f"3.{token}"}
    four = run({"p": "1", "q": "4"}, local="copy")
    assert four["p"] == f"1.{token}" and four["q"] == "4" and "." not in four["a"]  # p: the redone outputs' identity
    run({"p": "1", "q": "4"}, local="copy", fresh=True, finish=False)  # a redo, interrupted ...
    begun = read_json(tmp_path / "a.partial.json")
    resumed = run({"p": "1", "q": "4"}, local="copy")  # ... and resumed: the identities it began with
    assert resumed == {"a": begun["identity"], **begun["parts"]} and resumed["q"].startswith("4.")
