from aimesh_runtime.server import main
from aimesh_user.server import SPEC

main([SPEC])
