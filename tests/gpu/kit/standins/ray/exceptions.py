"""The exception classes of ``ray.exceptions`` that dispo-ray catches (GPU kit stand-in)."""


class RayError(Exception):
    pass


class RayTaskError(RayError):
    pass


class RayActorError(RayError):
    pass


class ActorDiedError(RayActorError):
    pass


class ActorUnavailableError(RayActorError):
    pass


class GetTimeoutError(RayError, TimeoutError):
    pass


class WorkerCrashedError(RayError):
    pass


class ObjectLostError(RayError):
    pass
