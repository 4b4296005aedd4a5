"""Where each raw data set comes from and the sha256 of every file the pipeline reads.

The checksums are those of the official archives' files (the read-only mirror described in
shared/datasets/README.md was checked against them). A file whose bytes differ stops the
download stage; nothing downstream ever reads an unchecked file.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RawFile:
    path: str  # relative to data/raw/<dataset>/
    sha256: str


@dataclass(frozen=True)
class Source:
    name: str
    files: tuple[RawFile, ...]
    citation: str
    archive_url: str | None = None  # a zip whose members end with the files' paths
    licensed: bool = False  # cannot be fetched without accepting the owner's terms
    how_to_obtain: str = ""


COAT = Source(
    name="coat",
    files=(
        RawFile("train.ascii", "a87bd9e7eaf3b89f976df3f25d4aa5d5d871be8a00b58947df9e6e015559bd37"),
        RawFile("test.ascii", "de6714ab105a5e0be8166be7fd313901b29f9a09c3bea307901457d1d71847e6"),
        RawFile(
            "user_item_features/item_features.ascii",
            "edea8217ec5606779b4d3bf819f7591dc63bcd5194d619e8048c2322d07630b1",
        ),
        RawFile(
            "user_item_features/item_features_map.txt",
            "2675dfaa38b89a9cbb1997f0cfcd46ed7e0e366dc515d12d95508d1f356e5d25",
        ),
        RawFile(
            "user_item_features/user_features.ascii",
            "d8f9531b601c54a7272602f8b21fa6cb4652cbf122e35d8615ea9645ebbf1b1f",
        ),
        RawFile(
            "user_item_features/user_features_map.txt",
            "3b8c825ad4445d4a46a400629c5fb43c805ff5a7982b2e436b69e7262c8a013a",
        ),
    ),
    archive_url="https://www.cs.cornell.edu/~schnabts/mnar/coat.zip",
    citation="Schnabel et al., Recommendations as Treatments, ICML 2016 (research use)",
)

YAHOO = Source(
    name="yahoo",
    files=(
        RawFile(
            "ydata-ymusic-rating-study-v1_0-train.txt",
            "85538b3c4a93eafc4f0ce2d39a6cd178e32a6b615ce775b9d635f7995706269d",
        ),
        RawFile(
            "ydata-ymusic-rating-study-v1_0-test.txt",
            "f27a73bef8c7ccedb17576fe2d4cc52b80c2d5fa60f13529596f003ffd0d8533",
        ),
    ),
    licensed=True,
    how_to_obtain=(
        "Yahoo! R3 is licensed by Yahoo Webscope and cannot be downloaded automatically. "
        "Request 'R3 - Yahoo! Music ratings for User Selected and Randomly Selected songs' at "
        "https://webscope.sandbox.yahoo.com/ (accepting Yahoo's data agreement), unpack it and "
        "copy ydata-ymusic-rating-study-v1_0-train.txt and ydata-ymusic-rating-study-v1_0-test.txt "
        "into {manual_dir}/ (or into $UBO_DATA_MIRROR/yahoo/), then run `dvc repro` again."
    ),
    citation="Yahoo! Webscope R3 (not redistributable; obtain it yourself)",
)

ML100K = Source(
    name="ml100k",
    files=(
        RawFile("u.data", "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490"),
        RawFile("u.item", "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701"),
        RawFile("u.user", "f120e114da2e8cf314fd28f99417c94ae9ddf1cb6db8ce0e4b5995d40e90e62c"),
        RawFile("u.genre", "9757e0d3e6b298159a80dd48eaf938114690e911e39af97a76949ef1663610bb"),
        RawFile("u.info", "5b0a40b2e47a729ee6203063f6dcf8790c2e63f5a18663e6ee318a72c5f3c27b"),
        RawFile("u.occupation", "cd5fbec9afe345d993a62fc7817df1a4a9079c4feb267b3118763b8fd942137d"),
        RawFile("README", "4883b8cf340ed0059971b33f56ad3adc88a40792108ebca3d24aafc4c82e8b52"),
    ),
    archive_url="https://files.grouplens.org/datasets/movielens/ml-100k.zip",
    citation="Harper & Konstan, The MovieLens Datasets, TiiS 2015 (research use; GroupLens)",
)

# Amazon CDs: the file is derived (ubo_core.datasets.amazon) from two raw files of the 2014
# Amazon review data. Offline the mirror holds the derived file itself.
AMAZON_CDS = Source(
    name="amazon_cds",
    files=(
        RawFile(
            "cds_interactions.tsv",
            "81f2b1634f4cf8fc550bd9ab25a914994a362749acec26a42f5a2009f2960cbe",
        ),
    ),
    citation="He & McAuley, Ups and Downs, WWW 2016 (research use)",
)
AMAZON_RATINGS_URL = (
    "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/ratings_CDs_and_Vinyl.csv"
)
AMAZON_REVIEWS_5CORE_URL = "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/reviews_CDs_and_Vinyl_5.json.gz"
# sha256 of the derived subset's sorted "user\titem\n" lines: the pairs, not their order.
# The original derivation sorted by timestamp with an unstable sort, so the order of items
# with equal timestamps cannot be reproduced byte for byte; the set of pairs can.
AMAZON_CDS_PAIRS_SHA256 = "0e968b14a37b75c2f170cde4972a28a388a60ffc565a1aed3f6332bcd646b1ce"
