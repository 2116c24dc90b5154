"""The decoder's thread count, found by trial: pure logic, then the decoder using it."""

import threading
import time

import torch

from pipeline._decoder import Decoder
from pipeline._tuner import ThreadTuner


def _run(tuner, rate_of, batches):
    picked = []
    for _ in range(batches):
        threads = tuner.pick()
        picked.append(threads)
        tuner.record(threads, images=100, seconds=100 / rate_of(threads))
    return picked


def test_the_counts_tried_are_powers_of_two_up_to_the_threads():
    assert ThreadTuner(1).candidates == (1,)
    assert ThreadTuner(6).candidates == (1, 2, 4, 6)
    assert ThreadTuner(16).candidates == (1, 2, 4, 8, 16)


def test_it_keeps_the_fastest_count_and_tries_again_each_period():
    tuner = ThreadTuner(8, period=10)
    picked = _run(tuner, {1: 5000, 2: 4000, 4: 3000, 8: 2500}.get, 1 + 4 + 1 + 4 + 10 + 4)
    assert picked[:5] == [8, 1, 2, 4, 8]  # the warm-up batch at all threads, then each count once
    assert picked[5:10] == [1, 1, 2, 4, 8]  # small images: one thread is fastest; held a batch, tried again
    assert picked[10:20] == [1] * 10  # confirmed: held for the period
    assert picked[20:] == [1, 2, 4, 8]  # and the trials again
    # the images change (larger ones): the next trials find it
    picked = _run(tuner, {1: 100, 2: 190, 4: 350, 8: 600}.get, 10 + 4 + 10)
    assert picked == [1] * 10 + [1, 2, 4, 8] + [8] * 10


def test_a_lone_thread_has_nothing_to_try():
    tuner = ThreadTuner(1, period=2)
    assert set(_run(tuner, lambda t: 1000, 9)) == {1}


def test_reports_of_other_counts_or_empty_batches_do_not_end_a_trial():
    tuner = ThreadTuner(4)
    tuner.record(4, 10, 1.0)  # the warm-up
    assert tuner.pick() == 1
    tuner.record(4, 10, 1.0)  # another shard's batch, begun before the trials
    tuner.record(1, 0, 0.0)  # an empty batch
    assert tuner.pick() == 1


def test_the_decoder_uses_the_tuned_count_and_finds_that_waiting_work_wants_threads():
    # images whose decoding waits without the GIL (as a long C decode does): more threads win
    seen = []

    class Slow(Decoder):
        def one(self, raw, into=None):
            seen.append(threading.current_thread().name)
            time.sleep(0.002)
            return raw

    decoder = Slow(threads=4, resize=None, crop=None)
    decoder.tuner.period = 5
    images = [torch.zeros(3, 4, 4, dtype=torch.uint8)] * 16
    for _ in range(1 + 3):  # the warm-up, then a trial of 1, 2 and 4 threads
        seen.clear()
        assert len(decoder(images)) == 16
    assert decoder.tuner.pick() == 4
    seen.clear()
    decoder(images)
    assert len(set(seen)) == 4 and sum(n.startswith("actmap-decode") for n in set(seen)) == 3  # and the caller
    decoder.tuner = ThreadTuner(4)
    decoder.tuner.record(4, 1, 1.0)
    seen.clear()
    decoder(images)  # the trial of one thread: the caller's own
    assert set(seen) == {threading.current_thread().name}
    decoder.close()


def test_more_threads_within_the_margin_of_the_fastest_are_kept():
    # one trial batch each is noisy: a count with more threads that comes close is kept
    assert _run(ThreadTuner(2, period=5), {1: 1000, 2: 900}.get, 3 + 5)[3:] == [2] * 5
    assert _run(ThreadTuner(4, period=5), {1: 1000, 2: 1100, 4: 960}.get, 4 + 5)[4:] == [4] * 5
    # far slower (as 16 threads were on small images, GIL-bound): the fewer are kept
    assert _run(ThreadTuner(16, period=5), {1: 1000, 2: 700, 4: 600, 8: 550, 16: 500}.get, 6 + 1 + 5 + 5)[-5:] == [1] * 5
    assert _run(ThreadTuner(2, period=5, margin=0.0), {1: 1000, 2: 990}.get, 3 + 1 + 2 + 5)[-5:] == [1] * 5


def test_one_noisy_trial_that_favours_fewer_threads_costs_a_few_batches_not_a_period():
    tuner = ThreadTuner(2, period=64)
    picked = []
    for batch in range(1 + 2 + 64 + 2 + 8 + 2 + 10):
        noisy = 67 <= batch < 69  # the second round of trials, where 2 threads happen to be slow
        threads = tuner.pick()
        picked.append(threads)
        tuner.record(threads, images=100, seconds=100 / {1: 1000, 2: 600 if noisy else 2000}[threads])
    assert picked[:3] == [2, 1, 2] and picked[3:67] == [2] * 64  # the warm-up, the trials, the period
    assert picked[67:69] == [1, 2]  # the noisy trials
    assert picked[69:77] == [1] * 8  # 1 thread held for period // 8 batches only
    assert picked[77:79] == [1, 2]  # tried again: 2 threads are back, for the period
    assert picked[79:] == [2] * 10


def test_batches_not_timed_take_the_fastest_count_and_count_towards_the_period():
    # batches of shards decoded at once are never trials: had they taken the trial's count
    # (1 thread first), trials that only lone batches end would have kept them at 1 for good
    tuner = ThreadTuner(4, period=16)
    tuner.record(4, 100, 1.0)  # the warm-up
    assert tuner.pick(trial=False) == 4 and tuner.pick() == 1
    for _ in range(5):
        tuner.record(4, 100, None)  # shared the threads: no trial ends
    assert tuner.pick() == 1
    for threads, rate in [(1, 1000), (2, 1900), (4, 1500)]:
        tuner.record(threads, 100, 100 / rate)
    assert tuner.pick() == tuner.pick(trial=False) == 2
    for _ in range(2):  # a pick of fewer threads is held period // 8 batches, untimed ones too
        tuner.record(2, 100, None)
    assert tuner.pick() == 1 and tuner.pick(trial=False) == 2  # trials again


def test_shards_decoded_at_once_decode_on_their_own_threads_and_only_a_batch_alone_is_timed():
    # batches that took turns on the pool left each shard's own thread waiting (two shards at
    # once, Parquet source alone on 2 threads: 0.77x its floor); a batch timed while another
    # shared the threads misled the tuner into too few of them
    meet = threading.Barrier(2, timeout=10)

    class Meeting(Decoder):
        def one(self, raw, into=None):
            if raw is None:
                meet.wait()  # passes only if both shards' batches are decoding at once
            return raw

    decoder = Meeting(threads=2)
    timed = []
    decoder.tuner.record = lambda threads, images, seconds: timed.append((threads, seconds is not None))
    other = threading.Thread(target=lambda: decoder([None]))
    other.start()
    assert decoder([None]) == [None]
    other.join()
    assert timed == [(1, False), (1, False)]  # neither batch ran alone: counted, not timed
    image = torch.zeros(3, 4, 4, dtype=torch.uint8)
    decoder([image] * 4)
    assert timed[2:] == [(2, True)]  # alone: the caller and a thread of the pool, timed
    decoder.close()
