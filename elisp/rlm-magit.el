;;; rlm-magit.el --- Review git changes with rlm from Magit  -*- lexical-binding: t; -*-

;; Copyright (C) 2026 The rlmd authors

;; Author: The rlmd authors
;; URL: https://github.com/rlmd/rlmd

;; This file is not part of GNU Emacs.

;; This program is free software; you can redistribute it and/or modify
;; it under the terms of the GNU General Public License as published by
;; the Free Software Foundation, either version 3 of the License, or
;; (at your option) any later version.

;; This program is distributed in the hope that it will be useful,
;; but WITHOUT ANY WARRANTY; without even the implied warranty of
;; MERCHANTABILITY or FITNESS FOR A PARTICULAR PURPOSE.  See the
;; GNU General Public License for more details.

;; You should have received a copy of the GNU General Public License
;; along with this program.  If not, see <https://www.gnu.org/licenses/>.

;;; Commentary:

;; `rlm-magit-review' sends a diff to the rlm daemon with the question
;; `rlm-review-question' and shows the review in a result buffer whose
;; path:line references jump to the diff.  Which diff:
;;
;;   - in a commit (revision) buffer, or on a commit: that commit;
;;   - in a diff buffer: the diff it shows;
;;   - in the status buffer, in the staged or unstaged changes: those
;;     changes (only one file's when point is on a file or a hunk);
;;   - elsewhere in the status buffer: the staged changes, else the
;;     unstaged ones.
;;
;; It is also a suffix of the `magit-diff' transient (key "R", so
;; "d R" from the status or a diff buffer).  This file is loaded only
;; when Magit is; `rlm-review-diff' in rlm.el reviews any `diff-mode'
;; buffer without Magit.

;;; Code:

(require 'rlm)
(require 'magit)
(require 'diff-mode)

(defvar magit-buffer-range)
(defvar magit-buffer-typearg)
(defvar magit-buffer-diff-args)
(defvar magit-buffer-diff-files)
(defvar magit-buffer-revision)

(defun rlm-magit--commit (rev)
  "Return (DESCRIPTION . GIT-ARGS) showing commit REV."
  (cons (format "commit %s" (magit-rev-abbrev rev))
        (list "show" "--no-color" "--no-ext-diff" "--format=medium" "-p" rev)))

(defun rlm-magit--worktree (cached file)
  "Return (DESCRIPTION . GIT-ARGS) for the staged (CACHED) or unstaged diff.
FILE, when non-nil, limits the diff to it."
  (cons (concat (if cached "staged changes" "unstaged changes")
                (if file (format " in %s" file) ""))
        (append (list "diff" "--no-color" "--no-ext-diff")
                (and cached (list "--cached"))
                (and file (list "--" file)))))

(defun rlm-magit-diff-target ()
  "Return (DESCRIPTION . GIT-ARGS) for the diff at point."
  (let ((file (and (magit-section-match '([file staged] [hunk file staged]
                                          [file unstaged] [hunk file unstaged]))
                   (magit-file-at-point))))
    (cond
     ((derived-mode-p 'magit-revision-mode) (rlm-magit--commit magit-buffer-revision))
     ((derived-mode-p 'magit-diff-mode)
      (cons (format "diff %s" (or magit-buffer-range magit-buffer-typearg "of the worktree"))
            (append (list "diff" "--no-color" "--no-ext-diff")
                    (and magit-buffer-typearg (list magit-buffer-typearg))
                    (and magit-buffer-range (list magit-buffer-range))
                    (remove "--stat" magit-buffer-diff-args)
                    (list "--")
                    magit-buffer-diff-files)))
     ((magit-section-match 'commit)
      (rlm-magit--commit (oref (magit-current-section) value)))
     ((magit-section-match [* staged]) (rlm-magit--worktree t file))
     ((magit-section-match [* unstaged]) (rlm-magit--worktree nil file))
     ((magit-anything-staged-p) (rlm-magit--worktree t nil))
     (t (rlm-magit--worktree nil nil)))))

(defun rlm-magit-diff-buffer (description args)
  "Return a `diff-mode' buffer holding the output of git ARGS.
DESCRIPTION names it.  Signal a `user-error' when the diff is empty."
  (let* ((dir (or (magit-toplevel) default-directory))
         (text (let ((default-directory dir)) (magit-git-output args))))
    (when (string-blank-p (or text ""))
      (user-error "No changes to review (%s)" description))
    (let* ((name (format "*rlm diff: %s*" description))
           (old (get-buffer name)))
      ;; Reuse the buffer of the same diff (its context is cached); a
      ;; new diff gets a new buffer, so that older reviews keep linking
      ;; to the diff they reviewed.
      (if (and old (equal (with-current-buffer old
                            (buffer-substring-no-properties (point-min) (point-max)))
                          text))
          old
        (with-current-buffer (generate-new-buffer name)
          (insert text)
          (diff-mode)
          (setq default-directory dir)
          (setq buffer-read-only t)
          (set-buffer-modified-p nil)
          (goto-char (point-min))
          (current-buffer))))))

;;;###autoload
(defun rlm-magit-review (&optional question)
  "Review the diff at point (see the Commentary) with the rlm daemon.
With a prefix argument, read the QUESTION instead of using
`rlm-review-question'.  Return the `rlm-job'."
  (interactive (list (and current-prefix-arg
                          (read-string "Ask rlm about the diff: " nil 'rlm-question-history))))
  (pcase-let* ((`(,description . ,args) (rlm-magit-diff-target))
               (buf (rlm-magit-diff-buffer description args)))
    (rlm-review buf description question)))

(defun rlm-magit--add-suffix ()
  "Add `rlm-magit-review' to the `magit-diff' transient, once."
  (unless (ignore-errors (transient-get-suffix 'magit-diff "R"))
    (condition-case err
        (transient-append-suffix 'magit-diff "t"
          '("R" "Review with rlm" rlm-magit-review))
      (error (message "rlm-magit: could not add to the magit-diff transient: %s"
                      (error-message-string err))))))

(rlm-magit--add-suffix)

;; Loaded with Magit, never without it.
;;;###autoload (with-eval-after-load 'magit (require 'rlm-magit))

(provide 'rlm-magit)
;;; rlm-magit.el ends here
