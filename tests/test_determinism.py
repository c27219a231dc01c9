"""The same seed gives the same run whatever the number of data-loading workers: a batch's random augmentations
are drawn from its own seed, not from whichever process loads it."""

from tests.conftest import digits_updates


def test_the_number_of_workers_does_not_change_the_training(experiment, digits_path):
    def trained(workers: int) -> list[str]:
        outcome = experiment(
            "with", *digits_updates(digits_path), "epochs=1", "cpu=True", f"dataset.num_workers={workers}"
        )
        assert outcome.code == 0, outcome.err
        # The epoch's losses and its recalls (the final numbers may be those of the untrained epoch 0).
        lines = [line.split(" | ") for line in outcome.out.splitlines() if line.startswith(("Train ", "Epoch   1"))]
        return [parts[1] if parts[0].startswith("Train") else " | ".join(parts[1:]) for parts in lines]

    numbers = trained(0)
    assert len(numbers) == 3 and numbers == trained(2)
