"""The routing keys of requests and the affinity table (pure Python: no Ray needed)."""

from __future__ import annotations

import pytest

from glmv.ray.affinity import AffinityKeys, AffinityTable, affinity_keys, rendezvous_order


def user(text: str, image: str | None = None) -> dict[str, object]:
    if image is None:
        return {"role": "user", "content": text}
    return {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": text}],
    }


def test_all_turns_of_a_conversation_share_its_key() -> None:
    first = [{"role": "system", "content": "be brief"}, user("what is this?", "data:image/png;base64,AAAA")]
    turn1 = affinity_keys({"messages": first})
    turn2 = affinity_keys(
        {
            "messages": [*first, {"role": "assistant", "content": "a cat"}, user("what colour?")],
            "stream": True,
        }
    )
    assert turn1 == turn2
    assert turn1.conversation is not None and turn1.images is not None
    other_question = affinity_keys({"messages": [first[0], user("count them", "data:image/png;base64,AAAA")]})
    assert other_question.conversation != turn1.conversation
    assert other_question.images == turn1.images  # the same picture: its embedding is cached there
    other_system = affinity_keys({"messages": [{"role": "system", "content": "be long"}, first[1]]})
    assert other_system.conversation != turn1.conversation


def test_text_only_and_odd_bodies() -> None:
    keys = affinity_keys({"messages": [user("hello")]})
    assert keys.conversation is not None and keys.images is None
    assert keys.present() == (keys.conversation,)
    assert affinity_keys({"messages": [user("hello")]}) == keys
    assert affinity_keys({"messages": [user("hello!")]}) != keys
    # /v1/extract bodies: the images decide
    extract = affinity_keys({"images": ["data:image/png;base64,AAAA"], "schema": "invoice"})
    assert extract.conversation is None and extract.images is not None
    for body in (None, [], "text", {}, {"messages": []}, {"messages": "x"}, {"images": []}):
        assert not affinity_keys(body)
    # content the server will refuse still gets a key rather than an exception
    assert affinity_keys({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": 3}]}]})


def test_rendezvous_order_is_deterministic_and_moves_few_keys() -> None:
    replicas = ["a1", "b2", "c3"]
    assert rendezvous_order("k", replicas) == rendezvous_order("k", list(reversed(replicas)))
    assert sorted(rendezvous_order("k", replicas)) == sorted(replicas)
    keys = [f"conv-{i}" for i in range(300)]
    before = {k: rendezvous_order(k, replicas)[0] for k in keys}
    after = {k: rendezvous_order(k, [*replicas, "d4"])[0] for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(after[k] == "d4" for k in moved)  # a key only ever moves to the new replica
    assert 30 < len(moved) < 130  # about a quarter of them
    assert {before[k] for k in keys} == set(replicas)


def test_table_prefers_the_owner_until_it_is_busy() -> None:
    table = AffinityTable(imbalance_threshold=4)
    keys = AffinityKeys(conversation="c1", images="i1")
    replicas = ["a", "b"]
    placed = table.preferred(keys, replicas)
    assert placed == rendezvous_order("i1", replicas)[0]  # new: placed by its images
    table.record(keys, "b")
    assert table.owner("c1") == "b" and table.owner("i1") == "b"
    assert table.choose(keys, replicas, {"a": 0, "b": 4}) == "b"
    assert table.choose(keys, replicas, {"a": 0, "b": 5}) is None  # busy: the least loaded takes it
    assert table.choose(keys, replicas, {"a": None, "b": 50}) == "b"  # nothing known to compare with
    assert table.choose(keys, ["a"], {"a": 0}) == "a"  # owner gone: placed again among the live
    # a later question about the same image goes where the image is
    assert table.preferred(AffinityKeys(conversation="c2", images="i1"), replicas) == "b"
    assert table.choose(AffinityKeys(), replicas, {}) is None
    assert table.forget("b") == 2 and len(table) == 0


def test_table_is_bounded() -> None:
    table = AffinityTable(capacity=3)
    for i in range(5):
        table.record(AffinityKeys(conversation=f"c{i}"), "a")
    assert len(table) == 3
    assert table.owner("c0") is None and table.owner("c4") == "a"
    with pytest.raises(ValueError):
        AffinityTable(capacity=0)
