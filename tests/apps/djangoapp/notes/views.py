from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt

from .models import Note

VERSION = "v1"


def index(request):
    """Counts visits in the session: every request with a cookie writes the session table."""
    request.session["visits"] = request.session.get("visits", 0) + 1
    return JsonResponse({"version": VERSION, "visits": request.session["visits"]})


def health(request):
    return JsonResponse({"ok": True, "version": VERSION, "notes": Note.objects.count()})


@csrf_exempt
def add_note(request):
    note = Note.objects.create(text=request.body.decode() or "note")
    return JsonResponse({"id": note.id, "version": VERSION})
