from fedllm.data.plays import load_plays, parse_play

PLAY = """# A Test Play

## ACT I

### SCENE I. A room.

_Enter HAMLET and HORATIO, with
attendants_

**HAMLET**  
To be, or not to be:  
that is the question.

**HORATIO**  
[Aside]_  
My lord\\--the king.

_Exit_

**HAMLET**  
A second speech.

*Sound a horn,
within.*

Still the same speech.

### SCENE II. Another room.

A line with no speaker is dropped.

**FIRST CITIZEN**  
Speak, speak.
"""


def test_parse_play_speeches_roles_and_order():
    play = parse_play(PLAY, "test-play")
    assert play.title == "A Test Play"
    assert [(s.role, s.text) for s in play.speeches] == [
        ("HAMLET", "To be, or not to be:\nthat is the question."),
        ("HORATIO", "My lord--the king."),
        ("HAMLET", "A second speech.\nStill the same speech."),
        ("FIRST CITIZEN", "Speak, speak."),
    ]
    assert [s.index for s in play.speeches] == [0, 1, 2, 3]


def test_embedded_plays_parse_cleanly():
    plays = load_plays()
    assert len(plays) >= 37
    speeches = [s for p in plays for s in p.speeches]
    assert len(speeches) > 30_000
    roles = {(s.play, s.role) for s in speeches}
    assert len(roles) > 1_400
    # no markup left in any speech
    assert not [s.text for s in speeches if any(m in s.text for m in ("**", "_", "#", "\\", "["))]
