"""Pack what a GPU training box needs into git-ignored folders, and unpack it there.

The lent GPU machine has JAX but no TensorFlow, no Keras and no package registry, sees only the
checkout (not ../shared), and takes at most 64 MiB of carried files. So, here:

    python3 bench/device/pack.py            # .whl/ (Keras and friends) + device_data/ (CRCHistoPhenotypes)

stores the images as lossless WebP (bit-exact, ~30% smaller than the PNGs), and on the device

    python3 bench/device/pack.py --unpack   # device_data/crchistophenotypes/images/*.png, native layout

writes them back as PNG so the ordinary ``crchisto:`` reader reads them. ``--litert`` downloads
the LiteRT runtime wheels into .litewhl/ instead (to time .tflite files on the device's CPU).
"""

import argparse
import glob
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np

WHEELS = ["keras==3.15.1", "namex", "absl-py", "rich", "markdown-it-py", "mdurl", "pygments", "joblib",
          "threadpoolctl"]
BINARY_WHEELS = ["optree", "h5py", "scikit-learn"]  # compiled: for the device's Python 3.12
PLATFORM = ["--python-version", "3.12", "--only-binary=:all:", "--platform", "manylinux_2_28_x86_64",
            "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"]
DATASET = "crchistophenotypes"
LITERT_WHEELS = ["ai-edge-litert", "flatbuffers", "tqdm", "backports.strenum", "typing_extensions", "protobuf"]


def pack(shared, out, wheels, dataset=DATASET):
    os.makedirs(wheels, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", wheels]
    subprocess.run(pip + WHEELS, check=True)
    subprocess.run(pip + PLATFORM + BINARY_WHEELS, check=True)
    target = pack_dataset(os.path.join(shared, dataset), os.path.join(out, dataset))
    size = sum(os.path.getsize(p) for d in (wheels, out) for p in glob.glob(os.path.join(d, "**"), recursive=True)
               if os.path.isfile(p))
    print(f"packed {wheels}/ and {target}/: {size / 2**20:.1f} MiB to carry (limit 64 MiB with the checkout)")


def pack_dataset(source, target):
    """Copy ``source`` without images/ to ``target``, images as bit-exact lossless WebP in webp/."""
    tmp = target + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("images"))
    os.makedirs(os.path.join(tmp, "webp"))
    for path in sorted(glob.glob(os.path.join(source, "images", "*.png"))):
        image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        if image is None:
            sys.exit(f"pack: cannot read {path}")
        ok, data = cv2.imencode(".webp", image, [cv2.IMWRITE_WEBP_QUALITY, 101])  # >100: lossless
        if not ok or not np.array_equal(cv2.imdecode(data, cv2.IMREAD_UNCHANGED), image):
            sys.exit(f"pack: lossless WebP of {path} does not round-trip")
        name = os.path.splitext(os.path.basename(path))[0] + ".webp"
        data.tofile(os.path.join(tmp, "webp", name))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def pack_litert(folder):
    """LiteRT and its pure dependencies for the device's Python 3.12 (int8 speed on its CPU)."""
    os.makedirs(folder, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", folder] + PLATFORM
                   + LITERT_WHEELS, check=True)
    print(f"packed {folder}/: " + ", ".join(sorted(os.listdir(folder))))


def unpack(out, dataset=DATASET):
    folder = os.path.join(out, dataset)
    images = os.path.join(folder, "images")
    os.makedirs(images, exist_ok=True)
    files = sorted(glob.glob(os.path.join(folder, "webp", "*.webp")))
    for path in files:
        image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        if image is None:
            sys.exit(f"unpack: cannot decode {path}")
        name = os.path.splitext(os.path.basename(path))[0] + ".png"
        cv2.imwrite(os.path.join(images, name), image)
    print(f"unpacked {len(files)} images into {images}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unpack", action="store_true", help="On the device: WebP back to the PNG layout.")
    parser.add_argument("--shared", default="../shared/data")
    parser.add_argument("--out", default="device_data")
    parser.add_argument("--wheels", default=".whl")
    parser.add_argument("--dataset", default=DATASET,
                        help="folder under --shared to pack or unpack (e.g. dsb2018/stage1_train for "
                             "bench/device/bench_training_gpu.sh's U-Net); its images/*.png travel as WebP")
    parser.add_argument("--litert", metavar="FOLDER", nargs="?", const=".litewhl",
                        help="only download LiteRT wheels for the device (default folder .litewhl)")
    args = parser.parse_args(argv)
    if args.litert:
        pack_litert(args.litert)
    elif args.unpack:
        unpack(args.out, args.dataset)
    else:
        pack(args.shared, args.out, args.wheels, args.dataset)


if __name__ == "__main__":
    main()
