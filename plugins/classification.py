"""Sequence classification from the first token or the pooled output."""

import keras

import kerasllm


class Classification(kerasllm.Head):
    """Args:
        num_classes: number of labels; examples carry an integer ``label``.
        representation: ``pooled`` (the backbone's pooler) or ``first_token``
            (the first token's final hidden state).
        dropout: on the representation before the classifier.
    """

    def __init__(self, backbone, tokenizer, num_classes, representation="pooled",
                 dropout=0.1, **kwargs):
        super().__init__(backbone, tokenizer, **kwargs)
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if representation not in ("pooled", "first_token"):
            raise ValueError(
                f"representation must be 'pooled' or 'first_token', got {representation!r}")
        if representation == "pooled" and not backbone.pooler:
            raise ValueError("representation 'pooled' needs model.pooler: true")
        self.num_classes = num_classes
        self.representation = representation
        self.dropout = keras.layers.Dropout(dropout)
        self.classifier = keras.layers.Dense(
            num_classes, kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.02),
            name="classifier",
        )
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name=f"{self.name}_accuracy")

    def build(self, sequence_output_shape):
        self.classifier.build((None, sequence_output_shape[-1]))

    def prepare(self, features, seed):
        features = dict(features)
        return features, {"labels": features.pop("label")}

    def call(self, backbone_outputs, inputs, training=False):
        if self.representation == "pooled":
            representation = backbone_outputs["pooled_output"]
        else:
            representation = backbone_outputs["sequence_output"][:, 0]
        return self.classifier(self.dropout(representation, training=training))

    def compute_loss(self, targets, predictions):
        return keras.ops.mean(keras.losses.sparse_categorical_crossentropy(
            targets["labels"], predictions, from_logits=True))

    def update_metrics(self, targets, predictions):
        self.accuracy.update_state(targets["labels"], predictions)


@kerasllm.hookimpl
def kerasllm_task_heads():
    return {"classification": Classification}
