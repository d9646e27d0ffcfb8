import pytest
import torch

from vitq.data import (DataError, calibration_subset, imagenet_synsets, load_tensors, make_dataset, make_loader,
                       read_list, scan_folder)
from vitq.zoo import get_entry

from conftest import write_images

SYN = ["n01440764", "n01443537", "n01484850", "n15075141"]  # indices 0, 1, 2, 999


def test_synset_list_is_imagenet_1k_order():
    s = imagenet_synsets()
    assert len(s) == 1000 and s[0] == "n01440764" and s[-1] == "n15075141" and list(s) == sorted(s)


@pytest.mark.parametrize("layout", ["flat", "folders"])
def test_both_layouts_give_imagenet_labels(tmp_path, layout):
    write_images(tmp_path, SYN, layout)
    ds = make_dataset(tmp_path, get_entry("deit_tiny").transform)
    assert sorted(ds.labels) == [0, 1, 2, 999]
    x, y = ds[0]
    assert x.shape == (3, 224, 224)


def test_transform_differs_by_family(tmp_path):
    write_images(tmp_path, SYN[:1])
    a = make_dataset(tmp_path, get_entry("deit_tiny").transform)[0][0]
    b = make_dataset(tmp_path, get_entry("vit_tiny").transform)[0][0]
    assert not torch.allclose(a, b)  # ImageNet mean/std vs 0.5/0.5


def test_list_selects_and_orders(tmp_path):
    names = write_images(tmp_path / "img", SYN)
    lst = tmp_path / "l.txt"
    lst.write_text(f"{names[3]}\n{names[0]}\n")
    ds = make_dataset(tmp_path / "img", get_entry("deit_tiny").transform, lst)
    assert ds.labels == [999, 0]
    assert len(make_dataset(tmp_path / "img", get_entry("deit_tiny").transform, lst, limit=1)) == 1


def test_list_naming_missing_files_is_an_error(tmp_path):
    write_images(tmp_path / "img", SYN[:1])
    lst = tmp_path / "l.txt"
    lst.write_text("n01440764_nothere.JPEG\n")
    with pytest.raises(DataError, match="n01440764_nothere.JPEG"):
        read_list(lst, tmp_path / "img")


def test_missing_and_empty_directories(tmp_path):
    with pytest.raises(DataError, match="not found"):
        scan_folder(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        scan_folder(tmp_path / "empty")


def test_corrupt_image_error_names_file_and_skip_counts(tmp_path):
    write_images(tmp_path, SYN[:3])
    (tmp_path / "n01484850_broken.JPEG").write_bytes(b"garbage")
    ds = make_dataset(tmp_path, get_entry("deit_tiny").transform)
    with pytest.raises(DataError, match="n01484850_broken.JPEG"):
        load_tensors(ds, workers=0)
    ds = make_dataset(tmp_path, get_entry("deit_tiny").transform, skip_bad_images=True)
    batches = list(make_loader(ds, batch_size=2, workers=0))
    assert sum(b.n_bad for b in batches) == 1
    assert sum(len(b.labels) for b in batches) == 3


def test_calibration_subset_is_seeded_and_disjoint_from_eval(tmp_path):
    names = write_images(tmp_path, SYN * 3)
    evals = names[:6]
    a = calibration_subset(tmp_path, 4, seed=0, exclude=evals)
    assert a == calibration_subset(tmp_path, 4, seed=0, exclude=evals)
    assert not set(a) & set(evals) and len(a) == 4
    with pytest.raises(DataError, match="outside the evaluation set"):
        calibration_subset(tmp_path, 10, seed=0, exclude=evals)


def test_file_without_synset_is_rejected(tmp_path):
    write_images(tmp_path, SYN[:1])
    (tmp_path / "holiday.jpg").write_bytes((tmp_path / "n01440764_img0.JPEG").read_bytes())
    with pytest.raises(DataError, match="holiday.jpg"):
        make_dataset(tmp_path, get_entry("deit_tiny").transform)


def test_16bit_and_float_images_are_scaled_not_clipped():
    import numpy as np
    from PIL import Image

    from vitq.data import to_rgb

    grey = np.full((8, 8), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    rgb = np.asarray(to_rgb(Image.fromarray(grey)))
    assert rgb.shape == (8, 8, 3) and abs(int(rgb.mean()) - 128) <= 1
    flt = np.asarray(to_rgb(Image.fromarray(np.full((4, 4), 0.25, dtype=np.float32))))
    assert abs(int(flt.mean()) - 64) <= 1


def test_duplicate_list_entries_are_refused(tmp_path):
    names = write_images(tmp_path, SYN[:3])
    lst = tmp_path / "l.txt"
    lst.write_text("\n".join([names[0], names[1], names[0]]))
    with pytest.raises(DataError, match=f"more than once: {names[0]}"):
        read_list(lst, tmp_path)


def test_bad_image_in_a_worker_is_one_line_in_the_main_process(tmp_path):
    write_images(tmp_path, SYN[:3])
    (tmp_path / "n01484850_broken.JPEG").write_bytes(b"garbage")
    ds = make_dataset(tmp_path, get_entry("deit_tiny").transform)
    with pytest.raises(DataError) as info:
        load_tensors(ds, workers=2)
    assert "n01484850_broken.JPEG" in str(info.value) and len(str(info.value).splitlines()) == 1
    ds = make_dataset(tmp_path, get_entry("deit_tiny").transform, skip_bad_images=True)
    load_tensors(ds, workers=2)
    assert [p.rsplit("/", 1)[-1] for p in ds.skipped] == ["n01484850_broken.JPEG"]


def test_labels_from_class_folders_of_any_name_a_mapping_or_none(tmp_path):
    from conftest import write_images as w

    root = tmp_path / "pets"
    for cls in ("dog", "cat"):
        w(root / cls, ["x", "y"], layout="flat")
    t = get_entry("deit_tiny").transform
    ds = make_dataset(root, t)  # auto: not synsets, every image in a class folder
    assert ds.label_mode == "folders" and [ds.labels[ds.files.index(f)] for f in sorted(ds.files)] == [0, 0, 1, 1]
    (tmp_path / "map.json").write_text('{"cat": 7, "dog": 3}')
    ds = make_dataset(root, t, labels=str(tmp_path / "map.json"))
    assert ds.label_mode == "mapping" and sorted(ds.labels) == [3, 3, 7, 7]
    (tmp_path / "map.txt").write_text("dog\ncat\n")
    assert sorted(make_dataset(root, t, labels=str(tmp_path / "map.txt")).labels) == [0, 0, 1, 1]
    assert make_dataset(root, t, labels="none").labels == [-1] * 4
    (tmp_path / "bad.json").write_text('{"dog": 0}')
    with pytest.raises(DataError, match="no index for class"):
        make_dataset(root, t, labels=str(tmp_path / "bad.json"))
    with pytest.raises(DataError, match="no such mode or mapping file"):
        make_dataset(root, t, labels="folder")
    with pytest.raises(DataError, match="ImageNet synset"):
        make_dataset(root, t, labels="imagenet")


def test_images_without_labels_give_agreement_and_kl_but_no_top1(tmp_path):
    import timm

    from vitq.evaluation import evaluate

    write_images(tmp_path, SYN[:4])
    ds = make_dataset(tmp_path, get_entry("deit_tiny").transform, labels="none")
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=224).eval()
    r = evaluate(model, make_loader(ds, workers=0), reference=model, progress=False)
    assert r.top1 is None and r.top5 is None and r.top1_delta_se is None
    assert r.agreement == 100.0 and r.kl is not None and "top1=n/a" in r.summary()


def test_class_folders_win_over_synset_file_names(tmp_path):
    write_images(tmp_path / "dog", SYN[:2])  # synset-prefixed names inside folders of the user's classes
    write_images(tmp_path / "other", SYN[2:4])
    ds = make_dataset(tmp_path, get_entry("deit_tiny").transform)
    assert ds.label_mode == "folders" and sorted(ds.labels) == [0, 0, 1, 1]
    assert make_dataset(tmp_path, get_entry("deit_tiny").transform, labels="imagenet").label_mode == "imagenet"
