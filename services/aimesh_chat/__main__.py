from aimesh_chat.server import SPEC
from aimesh_runtime.server import main

main([SPEC])
