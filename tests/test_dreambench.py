"""The DreamBench layout, read from the real copy (BENCH_TEST_DATA/dreambench) and from the stand-in of tests/data/mini."""

from __future__ import annotations

import pytest

from bench.dreambench import read_dreambench
from bench.errors import DataError


def test_reads_the_real_dreambench(shared_data):
    subjects = read_dreambench(shared_data / "dreambench")
    assert len(subjects) == 30 and sum(len(s.images) for s in subjects.values()) == 158
    assert sorted(n for n, s in subjects.items() if s.live) == ["cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]
    dog, backpack = subjects["dog"], subjects["backpack_dog"]
    assert dog.class_name == "dog" and len(dog.images) == 5 and dog.images[0].name == "00.jpg"
    assert backpack.class_name == "backpack" and not backpack.live
    assert dog.prompts()[0] == "a sks dog in the jungle" and dog.prompts()[10] == "a sks dog wearing a red hat"
    assert backpack.prompts("[V]")[24] == "a cube shaped [V] backpack"
    assert all(len(s.prompts()) == 25 for s in subjects.values())
    assert dog.instance_prompt() == "a photo of sks dog"
    assert subjects["bear_plushie"].prompts()[20] == "a red sks stuffed animal"


def test_reads_the_stand_in_dreambench_with_its_live_and_object_prompts(mini_data):
    subjects = read_dreambench(mini_data / "dreambench")
    assert list(subjects) == ["backpack", "backpack_dog", "cat", "dog"] and [len(s.images) for s in subjects.values()] == [2, 3, 2, 3]
    assert [n for n, s in subjects.items() if s.live] == ["cat", "dog"]
    dog, bag = subjects["dog"], subjects["backpack_dog"]
    assert dog.images[0].name == "00.png" and bag.class_name == "backpack" and not bag.live
    assert dog.prompts() == ["a sks dog in a cave", "a sks dog wearing a scarf", "a green sks dog"]  # the live-subject list
    assert bag.prompts("[V]") == ["a [V] backpack in a cave", "a [V] backpack on a wooden table", "a green [V] backpack"]
    assert dog.instance_prompt() == "a photo of sks dog"
    assert read_dreambench(mini_data / "dreambench" / "dataset")["cat"].images == subjects["cat"].images  # dataset/ itself


def test_malformed_or_missing_dreambench_is_one_clear_line(tmp_path):
    with pytest.raises(DataError, match="prompts_and_classes.txt"):
        read_dreambench(tmp_path)
    data = tmp_path / "dataset"
    data.mkdir()
    (data / "prompts_and_classes.txt").write_text(
        "Classes\n\nsubject_name,class\ndog,dog\n\nPrompts\n\nObject Prompts\n\nprompt_list = [\n"
        "'a {0} {1} in the jungle'.format(unique_token, class_token),\n]\n\nLive Subject Prompts\n\nprompt_list = [\n"
        "'a {0} {1} in the snow'.format(unique_token, class_token)\n]\n"
    )
    with pytest.raises(DataError, match="subject .dog. has no reference images"):
        read_dreambench(tmp_path)
    (data / "dog").mkdir()
    (data / "dog" / "00.jpg").write_bytes(b"")
    assert read_dreambench(tmp_path)["dog"].prompts() == ["a sks dog in the snow"]
    (data / "prompts_and_classes.txt").write_text("Classes\n\nsubject_name,class\ndog dog\n")
    with pytest.raises(DataError, match="malformed DreamBench class row"):
        read_dreambench(tmp_path)
