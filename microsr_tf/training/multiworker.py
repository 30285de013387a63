"""A small custom training loop for ``MultiWorkerMirroredStrategy``.

Keras 3 ``fit`` does not run under ``MultiWorkerMirroredStrategy`` (keras-team/keras#20585), so
multi-worker training drives the model's own ``train_step`` with ``strategy.run`` inside one
``tf.function``, feeds it from ``distribute_datasets_from_function`` (each worker reads its own
per-replica batches) and calls the same Keras callbacks as ``fit`` through ``CallbackList``.
Every worker runs the loop in lockstep; which worker writes files is up to the callbacks.
"""

from __future__ import annotations

from typing import Callable, Sequence

import keras
import tensorflow as tf

from microsr_tf.models.cyclegan import CycleGAN


def make_distributed_step(model: CycleGAN, strategy: tf.distribute.Strategy) -> Callable:
    """``step(iterator) -> logs``: one replicated ``train_step``, logs averaged over all replicas."""

    @tf.function
    def step(iterator):
        per_replica = strategy.run(model.train_step, args=(next(iterator),))
        return {k: strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None) for k, v in per_replica.items()}

    return step


def custom_loop(model: CycleGAN, strategy: tf.distribute.Strategy,
                dataset_fn: Callable[[tf.distribute.InputContext], tf.data.Dataset], epochs: int,
                steps_per_epoch: int, callbacks: Sequence[keras.callbacks.Callback] = ()) -> dict[str, float]:
    """Train from the model's current step (``model.optimizer.iterations``) to ``epochs`` epochs.

    A resumed run finishes its interrupted epoch first. Stops early when a callback sets
    ``model.stop_training``. Returns the last logs.
    """
    dataset = strategy.distribute_datasets_from_function(dataset_fn)
    iterator = iter(dataset)
    step = make_distributed_step(model, strategy)
    cbs = keras.callbacks.CallbackList(list(callbacks), model=model, epochs=epochs, steps=steps_per_epoch,
                                       verbose=0)
    done = int(model.optimizer.iterations.numpy())
    first_epoch, offset = divmod(done, steps_per_epoch)
    model.stop_training = False
    logs: dict[str, float] = {}
    cbs.on_train_begin()
    for epoch in range(first_epoch, epochs):
        model.reset_metrics()
        cbs.on_epoch_begin(epoch)
        for batch in range(offset if epoch == first_epoch else 0, steps_per_epoch):
            cbs.on_train_batch_begin(batch)
            logs = {k: float(v) for k, v in step(iterator).items()}
            cbs.on_train_batch_end(batch, logs)
            if model.stop_training:
                break
        cbs.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    cbs.on_train_end(logs)
    return logs
