import pytest
import torch
from torch import nn

from leanserve.demo import build_cnn
from leanserve.errors import InvalidInput
from leanserve.optimize.distill import capture_outputs, distill, feature_loss, width_student
from leanserve.optimize.train import count_params, top1_accuracy


@pytest.fixture(scope="module")
def teacher(digits_teacher):
    return digits_teacher


def test_width_student_halves_every_hidden_layer_and_keeps_the_classes(teacher, digits):
    student = width_student(teacher, torch.from_numpy(digits[1][:2]), 0.5)
    assert [m.out_channels for m in student.modules() if isinstance(m, nn.Conv2d)] == [8, 16]
    assert [m.out_features for m in student.modules() if isinstance(m, nn.Linear)] == [32, 10]
    assert count_params(student) < 0.3 * count_params(teacher)
    assert [m.out_channels for m in teacher.modules() if isinstance(m, nn.Conv2d)] == [16, 32]


def test_distilled_half_width_student_stays_accurate_with_a_quarter_of_the_parameters(teacher, digits):
    x_train, x_test, y_train, y_test = digits
    student = width_student(teacher, torch.from_numpy(x_test[:2]), 0.5)
    report = distill(teacher, student, x_train, y_train, epochs=2, progress=False)
    assert report.student_params < 0.3 * report.teacher_params
    accuracy = top1_accuracy(report.student, x_test, y_test)
    assert accuracy > 0.9 and accuracy >= top1_accuracy(teacher, x_test, y_test) - 0.03
    assert len(report.losses) == 2 and report.losses[-1] < report.losses[0]


def test_soft_targets_alone_teach_a_fresh_student_the_task(teacher, digits):
    # No labels at all: everything the student knows about digits comes from the teacher's outputs.
    x_train, x_test, _, y_test = digits
    torch.manual_seed(0)
    fresh = build_cnn(width=8)
    assert top1_accuracy(fresh, x_test, y_test) < 0.3
    report = distill(teacher, fresh, x_train, None, epochs=3, lr=3e-3, progress=False)
    assert top1_accuracy(report.student, x_test, y_test) > 0.85  # about 0.92 observed; chance is 0.1
    assert "only" in report.notes[1]


def test_feature_distillation_trains_the_projections_with_the_student(teacher, digits):
    x_train, x_test, y_train, _ = digits
    student = width_student(teacher, torch.from_numpy(x_test[:2]), 0.5)
    pairs = [("3", "3"), ("7", "7")]  # second conv (32 vs 16 channels), first Linear (64 vs 32 features)
    report = distill(teacher, student, x_train, y_train, epochs=2, feature_pairs=pairs, progress=False)
    conv_projection, linear_projection = report.projections
    assert isinstance(conv_projection, nn.Conv2d) and conv_projection.kernel_size == (1, 1)
    assert (conv_projection.in_channels, conv_projection.out_channels) == (16, 32)
    assert isinstance(linear_projection, nn.Linear) and linear_projection.weight.shape == (64, 32)
    x = torch.from_numpy(x_test)
    with capture_outputs(teacher, ["3"]) as t_feats, capture_outputs(report.student, ["3"]) as s_feats, torch.no_grad():
        teacher(x), report.student(x)
        trained = feature_loss(conv_projection(s_feats["3"]), t_feats["3"])
        untrained = feature_loss(nn.Conv2d(16, 32, 1)(s_feats["3"]), t_feats["3"])
    assert trained < 0.5 * untrained
    assert report.student_params == count_params(student)  # the projections are not part of the student


@pytest.mark.parametrize("call, argument", [
    (lambda t, x, y: width_student(t, x[:2], 0), "multiplier"),
    (lambda t, x, y: width_student(t, x[:2], 1.5), "multiplier"),
    (lambda t, x, y: distill(t, t, x, y, epochs=1, feature_pairs=[("no_such", "3")]), "feature_pairs.*no_such"),
    (lambda t, x, y: distill(t, t, x, y, epochs=1, feature_pairs=[("3", "missing")]), "feature_pairs.*missing"),
    (lambda t, x, y: distill(t, t, x, y, epochs=1, temperature=0), "temperature"),
    (lambda t, x, y: distill(t, t, x, y, epochs=1, alpha=1.5), "alpha"),
    (lambda t, x, y: distill(t, t, x, y, epochs=0), "epochs"),
    (lambda t, x, y: distill(t, t, x, y[:3], epochs=1), "y_train"),
])
def test_bad_arguments_raise_invalid_input_naming_them(call, argument):
    model = build_cnn(width=4)
    with pytest.raises(InvalidInput, match=argument):
        call(model, torch.zeros(8, 1, 28, 28), torch.zeros(8, dtype=torch.long))


def test_mismatched_feature_shapes_are_refused(teacher, digits):
    x_train, _, y_train, _ = digits
    with pytest.raises(InvalidInput, match="cannot be projected"):
        distill(teacher, build_cnn(width=8), x_train[:64], y_train[:64], epochs=1, feature_pairs=[("3", "7")])
