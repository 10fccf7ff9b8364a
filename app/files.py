"""OpenAI's Files API (the part batches need): upload, list, retrieve, download, delete."""
from __future__ import annotations

from typing import Optional

from flask import Response, request

from app.errors import APIError
from jobs.files import FileMeta, FileStore

UPLOAD_PURPOSES = ("batch",)


class FileService:
    def __init__(self, files: FileStore, max_file_bytes: int):
        self.files = files
        self.max_file_bytes = max_file_bytes

    def upload(self, owner: str) -> dict:
        request.max_content_length = self.max_file_bytes  # files may be larger than a chat request
        purpose = request.form.get("purpose")
        if purpose not in UPLOAD_PURPOSES:
            raise APIError(400, f"purpose must be one of {list(UPLOAD_PURPOSES)}.", param="purpose",
                           code="invalid_value")
        upload = request.files.get("file")
        if upload is None:
            raise APIError(400, "Missing required parameter: 'file'.", param="file",
                           code="missing_required_parameter")
        try:
            meta = self.files.save_stream(upload.stream, upload.filename or "upload.jsonl", purpose, owner)
        except UnicodeDecodeError:
            raise APIError(400, "The file must be UTF-8 encoded JSONL.", param="file", code="invalid_file")
        return meta.to_api()

    def get(self, file_id: str, owner: str) -> dict:
        return self._owned(file_id, owner).to_api()

    def content(self, file_id: str, owner: str) -> Response:
        meta = self._owned(file_id, owner)
        lines = (line + "\n" for line in self.files.iter_lines(meta.id))  # streamed in slices
        return Response(lines, mimetype="application/octet-stream")

    def delete(self, file_id: str, owner: str) -> dict:
        self.files.delete(self._owned(file_id, owner))
        return {"id": file_id, "object": "file", "deleted": True}

    def list(self, owner: str, limit: int, after: Optional[str]) -> dict:
        ids, has_more = self.files.list_ids(owner, limit, after)
        data = [m.to_api() for m in map(self.files.get, ids) if m]
        return {"object": "list", "data": data, "first_id": ids[0] if ids else None,
                "last_id": ids[-1] if ids else None, "has_more": has_more}

    def _owned(self, file_id: str, owner: str) -> FileMeta:
        meta = self.files.get(file_id)
        if meta is None or meta.owner != owner:
            raise APIError(404, f"No such File object: {file_id}", param="file_id", code="file_not_found")
        return meta
