"""Build a captioned 64x64 RGB emoji image set from freely licensed emoji art.

The art comes from pinned npm packages, fetched with ``npm pack`` into a cache
directory and checked against a pinned sha512 before use:

* ``emoji-datasource-google`` -- Google Noto Emoji PNGs (Apache-2.0), plus
  ``emoji.json``, the list of emoji, skin-tone variants and categories;
* ``emoji-datasource-twitter`` -- Twemoji PNGs (CC-BY-4.0);
* ``openmoji`` -- OpenMoji colour SVGs (CC-BY-SA-4.0), plus ``openmoji.json``
  whose CLDR short names ("red apple") and tags make the captions.

Optionally, a fourth style is drawn with the Noto Color Emoji font of the
Debian package ``fonts-noto-color-emoji`` (OFL-1.1) when it is installed.

Every image is alpha-composited onto a solid background (most of the PNGs hold
garbage colour under fully transparent pixels) and written as an RGB PNG. The
output is a Hugging Face ``imagefolder`` layout, built in a temporary
directory next to ``out_dir`` and renamed into place when complete::

    out_dir/train/<style>_<unified>.png     e.g. twitter_1f44b-1f3fd.png
    out_dir/train/metadata.jsonl            one JSON object per image
    out_dir/heldout/...                     ~5% of emoji with one style held out
    out_dir/ATTRIBUTION.md                  sources, licenses and credits
    out_dir/licenses/                       license files shipped by the sources
    out_dir/summary.json                    counts and source versions

The same inputs give byte-identical output. Run it with::

    amused build-emoji-data --out data/emoji

``datasets`` only guesses split names it knows (``heldout`` is not one), so
load both splits with::

    load_dataset("imagefolder", data_files={"train": "data/emoji/train/**",
                                            "heldout": "data/emoji/heldout/**"})
"""

from .build import *  # noqa: F401,F403
from .catalog import *  # noqa: F401,F403
from .cli import *  # noqa: F401,F403
from .packages import *  # noqa: F401,F403
from .render import *  # noqa: F401,F403
from .sources import *  # noqa: F401,F403
from .packages import _VARIATION_SELECTOR  # noqa: F401
