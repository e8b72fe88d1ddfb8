"""All five services in one process on one port, each with its own database.

The same ServiceSpecs as the separate processes: start as a monolith, split
into services later, without changing service code.
"""

from aimesh_chat.server import SPEC as CHAT
from aimesh_notify.server import SPEC as NOTIFY
from aimesh_recommend.server import SPEC as RECOMMEND
from aimesh_runtime.server import main
from aimesh_search.server import SPEC as SEARCH
from aimesh_user.server import SPEC as USER

SPECS = (USER, SEARCH, RECOMMEND, CHAT, NOTIFY)

if __name__ == "__main__":
    main(SPECS)
