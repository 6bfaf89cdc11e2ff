"""The private Lightning members lemis relies on (lemis.lightning_private) are all still there."""
from lemis.lightning_private import PRIVATE, missing


def test_every_private_lightning_member_lemis_uses_exists():
    assert missing() == []
    assert len(PRIVATE) >= 10


def test_the_check_can_fail():
    import lemis.lightning_private as private

    private.PRIVATE.append(("lightning.pytorch.callbacks.ModelCheckpoint", "_no_such_member", "nobody"))
    try:
        assert missing() == ["lightning.pytorch.callbacks.ModelCheckpoint._no_such_member (used by nobody)"]
    finally:
        private.PRIVATE.pop()
