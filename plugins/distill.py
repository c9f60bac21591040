"""Knowledge distillation (Hinton et al., 2015) from a saved kerasllm teacher.

The student learns the teacher's token-prediction objective (``mlm`` or
``clm``: the teacher's first head) from two targets at once: the hard labels,
and the teacher's temperature-softened distribution over the vocabulary::

    loss = (1 - soft_weight) * hard + soft_weight * T² * KL(teacher_T ‖ student_T)

where ``p_T = softmax(logits / T)``. The soft targets carry what the teacher
knows about the wrong tokens too ("dark knowledge"); the T² factor keeps their
gradients on the scale of the hard loss's as T changes (Hinton et al., §2).

The student runs the teacher's objective itself, taken from the plugin registry
by the teacher head's name and built on the student's backbone with the
teacher's options: its ``prepare`` draws the masks (or next-token targets)
once, and the same inputs feed student and teacher, so both predict the same
positions.

The teacher is loaded when the head is built, frozen, run in inference mode
and kept out of Keras' tracking: the student never trains it and its weights
are not saved with the student. A saved student's config keeps the teacher's
path, so reloading it loads the teacher again: keep the teacher file (give an
absolute path, or one relative to where you load the student). To use a student
without its teacher, copy its backbone and objective into a model of the plain
objective (``plain.backbone.set_weights(student.backbone.get_weights())``,
``plain.heads[0].set_weights(student.heads[0].objective.get_weights())``).

An exported student serves nothing of its own (its predictions run the
teacher, which the SavedModel does not hold): ``serving_default`` gives an
encoder's ``embedding`` and a decoder's generations. For the objective's own
outputs (``mlm``'s fillers), export the plain model made as above.
"""

import contextlib
import pathlib

import keras
import tensorflow as tf
from keras.src.backend.common import global_state

import kerasllm
from kerasllm.heads import Head, TokenPredictionHead, weighted_mean
from kerasllm.plugins import get_registry


class Teacher:
    """The frozen teacher and the head distilled from it. A plain object, not a
    Keras layer: what it holds is neither tracked, trained nor saved by the student."""

    def __init__(self, model, head):
        self.model = model
        self.head = head

    def logits(self, inputs):
        backbone = self.model.backbone
        outputs = backbone({key: inputs[key] for key in backbone.input_keys}, training=False)
        return self.head(outputs, inputs, training=False)


class Distillation(Head):
    """Args:
        teacher: a saved kerasllm model: a ``.keras`` file, or a folder holding
            ``model.keras``. Its first head must predict tokens (``mlm``,
            ``clm``: a ``kerasllm.TokenPredictionHead``); its tokenizer must
            have the student's vocabulary.
        temperature: T, dividing both models' logits before the softmax;
            above 1 softens the distributions.
        soft_weight: the soft (teacher) term's share of the loss; 0 is the
            plain objective on hard labels.
    """

    def __init__(self, backbone, tokenizer, teacher, temperature=2.0, soft_weight=0.5,
                 **kwargs):
        super().__init__(backbone, tokenizer, **kwargs)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or temperature <= 0:
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        if isinstance(soft_weight, bool) or not isinstance(soft_weight, (int, float)) \
                or not 0 <= soft_weight <= 1:
            raise ValueError(f"soft_weight must be in [0, 1], got {soft_weight!r}")
        self.temperature = float(temperature)
        self.soft_weight = float(soft_weight)
        model = load_teacher(teacher)
        teacher_head = token_prediction_head(model, teacher)
        check_compatible(model, backbone, tokenizer, teacher)
        where, head_config, kind = model.config.head_entries[0]
        cls = get_registry().get(kind, teacher_head.name, f"the teacher's {where}.name")
        # The student's own copy of the teacher's objective: its logits, targets and masks.
        self.objective = cls(backbone=backbone, tokenizer=tokenizer,
                             name=f"{self.name}_{teacher_head.name}", **head_config.options)
        missing = [key for key in model.input_keys_of([teacher_head])
                   if key not in (*backbone.input_keys, *self.objective.input_keys)]
        if missing:
            raise ValueError(f"the teacher needs inputs the student does not have: "
                             f"{', '.join(missing)} (compare model.num_segments)")
        self.input_keys = self.objective.input_keys
        self.builds_sequences = self.objective.builds_sequences
        self.packs_documents = self.objective.packs_documents
        model.trainable = False
        self.teacher = Teacher(model, teacher_head)
        self.kl_tracker = keras.metrics.Mean(name=f"{self.name}_kl")

    def row_length(self, sequence_length):
        return self.objective.row_length(sequence_length)

    def build(self, sequence_output_shape):
        self.objective.build(sequence_output_shape)

    def prepare(self, features, seed):
        length = features["token_ids"].shape[1]
        limit = self.teacher.model.backbone.max_sequence_length
        if length is not None and length > limit:
            raise ValueError(f"sequences of {length} tokens are longer than the teacher's "
                             f"max_sequence_length ({limit}); lower data.sequence_length")
        return self.objective.prepare(features, seed)

    def transform_inputs(self, inputs, training=False):
        return self.objective.transform_inputs(inputs, training=training)

    def call(self, backbone_outputs, inputs, training=False):
        return {"logits": self.objective(backbone_outputs, inputs, training=training),
                "teacher_logits": tf.stop_gradient(self.teacher.logits(inputs))}

    def kl(self, targets, predictions):
        """Mean KL(teacher_T ‖ student_T) over the positions the objective counts."""
        teacher = tf.nn.log_softmax(
            tf.cast(predictions["teacher_logits"], tf.float32) / self.temperature)
        student = tf.nn.log_softmax(
            tf.cast(predictions["logits"], tf.float32) / self.temperature)
        kl = tf.reduce_sum(tf.exp(teacher) * (teacher - student), axis=-1)
        return weighted_mean(kl, targets["weights"])

    def compute_loss(self, targets, predictions):
        hard = self.objective.compute_loss(targets, predictions["logits"])
        soft = self.temperature ** 2 * self.kl(targets, predictions)
        return (1 - self.soft_weight) * hard + self.soft_weight * soft

    def update_metrics(self, targets, predictions):
        # <name>_<objective>_loss: the hard-label loss; <name>_kl: the soft term before T².
        self.objective.loss_tracker.update_state(
            self.objective.compute_loss(targets, predictions["logits"]))
        self.objective.update_metrics(targets, predictions["logits"])
        self.kl_tracker.update_state(self.kl(targets, predictions))


def load_teacher(path):
    file = pathlib.Path(path)
    file = file / "model.keras" if file.is_dir() else file
    if not file.is_file():
        raise ValueError(
            f"teacher model not found: {path} (a .keras file, or a folder holding "
            "model.keras); a saved student needs its teacher to be rebuilt")
    get_registry()  # importing the plugins registers their Keras classes
    with outside_enclosing_load():
        # kerasllm.load_model, less the optimizer: a frozen teacher never trains,
        # and Adam's state would double or triple the memory it takes.
        return keras.saving.load_model(file, safe_mode=True, compile=False)


# Keras' deserialization state, global while a model loads. Reloading a student
# loads its teacher from inside the student's own load, where that state would
# leak into the teacher's: keras-hub tokenizers refuse to read vocabulary
# assets (even from the teacher's own archive) while a safe-mode config is being
# deserialized, and the inner load's exit would clear the outer one's
# shared-object maps. Keras has no public way to nest loads; this saves and
# restores the state, so the teacher loads as at top level (still in safe mode).
LOAD_STATE = ("safe_mode_saving", "shared_objects/id_to_obj_map",
              "shared_objects/id_to_config_map")


@contextlib.contextmanager
def outside_enclosing_load():
    saved = {key: global_state.get_global_attribute(key) for key in LOAD_STATE}
    for key in LOAD_STATE:
        global_state.set_global_attribute(key, None)
    try:
        yield
    finally:
        for key, value in saved.items():
            global_state.set_global_attribute(key, value)


def token_prediction_head(model, path):
    heads = getattr(model, "heads", [])
    if not heads or not isinstance(heads[0], TokenPredictionHead):
        found = f"'{heads[0].name}' ({type(heads[0]).__name__})" if heads else "no head"
        raise ValueError(
            f"the teacher {path} must have a token-prediction objective (mlm, clm) as its "
            f"first head; it has {found}")
    return heads[0]


def check_compatible(model, backbone, tokenizer, path):
    """The student predicts over the teacher's vocabulary, token for token."""
    teacher_vocabulary = model.tokenizer.get_vocabulary()
    vocabulary = tokenizer.get_vocabulary()
    if teacher_vocabulary != vocabulary:
        raise ValueError(
            f"the teacher {path} has a different vocabulary ({len(teacher_vocabulary)} "
            f"tokens) from the student's tokenizer ({len(vocabulary)} tokens); distil with "
            "the teacher's tokenizer (tokenizer.vocabulary)")
    if model.backbone.vocabulary_size != backbone.vocabulary_size:
        raise ValueError(
            f"the teacher predicts over {model.backbone.vocabulary_size} ids, the student "
            f"over {backbone.vocabulary_size}; set model.vocabulary_size to "
            f"{model.backbone.vocabulary_size}")
    if model.backbone.kind != backbone.kind:
        raise ValueError(f"the teacher's model.kind is {model.backbone.kind}, the student's "
                         f"{backbone.kind}; set model.kind: {model.backbone.kind}")


@kerasllm.hookimpl
def kerasllm_objectives():
    return {"distill": Distillation}
