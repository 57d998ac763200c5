"""The warm gate: small files are warmed after their LOOKUP while READs follow LOOKUPs, and not
while LOOKUPs go unread (stat, access checks), with a quick way back when reads resume."""

from nydus_py.fuse.warm import WarmGate


def test_it_warms_while_reads_follow_lookups() -> None:
    g = WarmGate(watch=4, limit=3)
    for ino in range(100):
        assert g.looked_up(ino)
        g.read(ino)
    assert (g.warmed, g.skipped, g.followed, g.unfollowed) == (100, 0, 100, 0)


def test_lookups_left_unread_stop_it_after_the_watch_list_fills() -> None:
    g = WarmGate(watch=4, limit=3, sample=1)  # (every LOOKUP watched while off: the score alone)
    answers = [g.looked_up(ino) for ino in range(20)]
    # the first 4 fill the watch list; the 5th pushes one out unread: the score goes negative
    assert answers[:4] == [True] * 4 and not any(answers[4:])
    assert g.unfollowed == 16 and g.score == -3  # bounded: it remembers `limit` misses, no more
    assert g.skipped == 16


def test_reads_of_looked_up_files_bring_it_back() -> None:
    g = WarmGate(watch=4, limit=3, sample=1)
    for ino in range(20):
        g.looked_up(ino)
    assert not g.looked_up(100)
    back = []
    for ino in range(200, 210):  # cat after stat: LOOKUP then READ again
        back.append(g.looked_up(ino))
        g.read(ino)
    # each followed LOOKUP raises the score by one; a READ takes its LOOKUP off the list, so
    # the unread ones left there stop pushing out after the first one: back within a few files
    assert back.index(True) == 3 and all(back[3:])
    assert g.followed == 10


def test_reads_of_files_not_looked_up_or_read_again_count_nothing() -> None:
    g = WarmGate(watch=4, limit=3)
    g.read(7)  # never looked up (its dentry was cached)
    g.looked_up(1)
    g.read(1)
    g.read(1)  # a second READ from offset 0 of the same file
    assert g.followed == 1 and g.score == 1


def test_a_file_looked_up_again_is_watched_once() -> None:
    g = WarmGate(watch=2, limit=3)
    for _ in range(10):
        g.looked_up(5)
    assert g.unfollowed == 0 and g.score == 0


def test_while_off_one_lookup_in_sample_is_watched_and_that_is_the_way_back() -> None:
    g = WarmGate(watch=4, limit=2, sample=4)
    for ino in range(10):
        g.looked_up(ino)
    assert g.score < 0
    watched_before = dict(g._watched)
    asked = [g.looked_up(1000 + k) for k in range(12)]
    assert not any(asked)
    assert len(set(g._watched) - set(watched_before)) == 3  # one in 4 watched; the rest only counted
    back = 0
    for ino in range(100, 200):  # READs follow LOOKUPs again: the sampled ones bring it back
        warmed = g.looked_up(ino)
        g.read(ino)
        if warmed:
            break
        back += 1
    assert g.score >= 0 and back < 40, (g.score, back)
