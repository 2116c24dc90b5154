"""The error hierarchy: one base, each error also its built-in kind, and safe to pickle."""

import pickle

import pytest

from pipeline import errors

BUILT_IN = {
    errors.ConfigError: ValueError,
    errors.OutputConflictError: ValueError,
    errors.OutputLockedError: ValueError,
    errors.DamagedDumpError: ValueError,
    errors.LockLostError: RuntimeError,
    errors.WorkersUnavailableError: RuntimeError,
    errors.ReservedColumnError: ValueError,
    errors.BadSampleError: RuntimeError,
    errors.ShardFailedError: RuntimeError,
    errors.DeviceMemoryError: RuntimeError,
    errors.LayerOutputError: RuntimeError,
    errors.ShapeChangedError: RuntimeError,
    errors.WeightsMismatchError: RuntimeError,
    errors.RecordError: ValueError,
    errors.UnknownDumpLayerError: KeyError,
}


def _examples():
    yield errors.ConfigError("run.batch_size", "must be at least 1, got 0")
    yield errors.OutputConflictError("run.output", "holds another run")
    yield errors.OutputLockedError("run.output", "is in use by another run")
    yield errors.ShardFailedError("shard 1 failed 3 times", errors.ShapeChangedError("shape"))
    yield errors.ReservedColumnError("index", ["index", "sample_id"])
    for cls in (errors.BadSampleError, errors.ShardFailedError, errors.LayerOutputError,
                errors.ShapeChangedError, errors.WeightsMismatchError, errors.RecordError,
                errors.UnknownDumpLayerError, errors.DamagedDumpError, errors.LockLostError,
                errors.WorkersUnavailableError, errors.DeviceMemoryError):
        yield cls(f"a {cls.__name__}")


def test_every_error_is_a_pipeline_error_and_its_built_in_kind():
    classes = {obj for obj in vars(errors).values()
               if isinstance(obj, type) and issubclass(obj, errors.PipelineError) and obj is not errors.PipelineError}
    assert classes == set(BUILT_IN)
    for cls, built_in in BUILT_IN.items():
        assert issubclass(cls, errors.PipelineError) and issubclass(cls, built_in)


@pytest.mark.parametrize("error", list(_examples()), ids=lambda e: type(e).__name__)
def test_errors_survive_pickling(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error) and copy.args == error.args
    assert vars(copy) == vars(error)


def test_config_errors_name_their_key():
    assert str(errors.ReservedColumnError("index", ["sample_id", "index"])).startswith(
        "source: the pass-through column 'index' clashes with an output column (index, sample_id)")
    assert errors.ReservedColumnError("index", []).key == "source"
    assert str(errors.ConfigError("", "no key")) == "no key"


def test_what_to_do_after_an_error():
    """``after`` is what the CLI prints once a run stopped on the error: a rerun resumes unless
    the error says otherwise."""
    assert errors.ShardFailedError("lost").after is None
    assert "fails the same way" in errors.ShardFailedError("x", errors.ShapeChangedError("y")).after
    assert "fails the same way" in pickle.loads(pickle.dumps(errors.ShardFailedError("x", errors.LayerOutputError("y")))).after
    assert "unset run.strict" in errors.BadSampleError("x").after
    alone = errors.ShardFailedError("x", errors.DeviceMemoryError("y")).after
    shared = pickle.loads(pickle.dumps(errors.ShardFailedError("x", errors.DeviceMemoryError("y", shared=True)))).after
    assert "Lower run.batch_size, then rerun" in alone and "run.gpus_per_actor: 1" in shared
