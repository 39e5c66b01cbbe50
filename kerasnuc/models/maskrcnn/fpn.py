"""Feature pyramid (Lin et al. 2017) on the ResNet stages conv2..conv5: P2..P5, and P6.

Lateral 1x1 convs, nearest x2 upsampling top-down, a 3x3 conv on every merged map; P6 is
P5 subsampled by 2 (a 1x1 max pool of stride 2, as Mask R-CNN) and only feeds the RPN.
"""

from keras import layers

STAGES = ("conv2", "conv3", "conv4", "conv5")


def feature_pyramid(features, filters):
    """ResNet ``features`` dict -> [P2, P3, P4, P5, P6], each with ``filters`` channels.

    Layers are named ``fpn_p2`` ... ``fpn_p6`` (the trainer finds the maps by these names).
    """
    laterals = [layers.Conv2D(filters, 1, name=f"fpn_c{k + 2}p{k + 2}")(features[stage])
                for k, stage in enumerate(STAGES)]
    merged = [laterals[-1]]
    for k in range(len(laterals) - 2, -1, -1):
        up = layers.UpSampling2D(2, name=f"fpn_p{k + 3}upsampled")(merged[0])
        merged.insert(0, layers.Add(name=f"fpn_p{k + 2}add")([up, laterals[k]]))
    pyramid = [layers.Conv2D(filters, 3, padding="same", name=f"fpn_p{k + 2}")(m) for k, m in enumerate(merged)]
    pyramid.append(layers.MaxPooling2D(1, strides=2, name="fpn_p6")(pyramid[-1]))
    return pyramid
