;;; ob-rlm.el --- Org Babel blocks that ask the rlm daemon  -*- lexical-binding: t; -*-

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

;; Org Babel support for the language "rlm": the body of the block is
;; a question for the rlm daemon, and its answer becomes the result.
;;
;;   #+begin_src rlm :context subtree :max-iterations 10
;;   Which decisions in this section are still open?
;;   #+end_src
;;
;; Header arguments:
;;
;;   :context  buffer | subtree | region | none | NAME | PATH
;;             the Org buffer, the subtree holding the block, the active
;;             region, nothing (the default), a context the daemon holds,
;;             or a file or directory (relative to the Org file) that the
;;             daemon reads
;;   :model            the root model (option root_model)
;;   :sub-model        the model answering sub-calls (option sub_model)
;;   :max-iterations   at most this many root turns
;;   :depth            the maximum recursion depth (option max_depth)
;;   :timeout          seconds the daemon may spend (option timeout_s)
;;   :async            yes | no; see `rlm-babel-async'
;;
;; Interactively, \\[org-ctrl-c-ctrl-c] inserts a placeholder at once and
;; replaces it with the answer when it arrives, so Emacs does not freeze;
;; in batch (e.g. an export) the block waits for the answer.

;;; Code:

(require 'ob)
(require 'org)
(require 'org-src)
(require 'rlm)

(defgroup rlm-babel nil
  "Org Babel blocks that ask the rlm daemon."
  :group 'rlm
  :prefix "rlm-babel-")

(defcustom rlm-babel-async 'interactive
  "When rlm blocks run asynchronously.
t: always (a placeholder is replaced by the answer later); nil:
never (Emacs waits); `interactive': unless Emacs runs in batch or
Org is exporting.  The header argument :async yes|no overrides it."
  :type '(choice (const :tag "Always" t)
                 (const :tag "Never" nil)
                 (const :tag "Unless batch or export" interactive))
  :group 'rlm-babel)

(defcustom rlm-babel-timeout 900
  "Seconds a synchronous rlm block waits before it cancels the query."
  :type 'number
  :group 'rlm-babel)

(defvar org-babel-default-header-args:rlm '((:context . "none"))
  "Default header arguments of rlm blocks.")

(defvar org-export-current-backend)

(defun rlm-babel--value (params key)
  "Return the header argument KEY of PARAMS as a string, or nil."
  (let ((v (cdr (assq key params))))
    (cond ((null v) nil)
          ((stringp v) (if (string-empty-p (string-trim v)) nil (string-trim v)))
          (t (format "%s" v)))))

(defun rlm-babel--number (params key)
  "Return the header argument KEY of PARAMS as a number, or nil."
  (let ((v (cdr (assq key params))))
    (cond ((numberp v) v)
          ((and (stringp v) (string-match-p "\\`[0-9.]+\\'" v)) (string-to-number v))
          ((null v) nil)
          (t (user-error "Header argument %s wants a number, not %S" key v)))))

(defun rlm-babel--options (params)
  "Return the query options given by the header arguments PARAMS."
  (rlm--plist :root_model (rlm-babel--value params :model)
              :sub_model (rlm-babel--value params :sub-model)
              :max_iterations (rlm-babel--number params :max-iterations)
              :max_depth (rlm-babel--number params :depth)
              :timeout_s (rlm-babel--number params :timeout)))

(defun rlm-babel--context (params)
  "Return (NAME . DESCRIPTION) of the context PARAMS ask for, or nil."
  (let ((spec (or (rlm-babel--value params :context) "none")))
    (pcase spec
      ("none" nil)
      ("buffer"
       (cons (rlm-buffer-context (current-buffer)) (format "buffer %s" (buffer-name))))
      ("subtree"
       (pcase-let ((`(,start ,end ,heading ,part) (rlm-subtree-bounds)))
         (cons (rlm-buffer-context (current-buffer) start end part)
               (format "subtree \"%s\"" heading))))
      ("region"
       (unless (use-region-p) (user-error ":context region, but no region is active"))
       (cons (rlm-buffer-context (current-buffer) (region-beginning) (region-end))
             "region"))
      (_
       (let ((path (expand-file-name spec)))
         (cond
          ((file-exists-p path)
           (cons (rlm-files-context (list path)) (abbreviate-file-name path)))
          ((rlm--context-exists-p spec) (cons spec (format "context %s" spec)))
          (t (user-error
              ":context %s is neither buffer, subtree, region, none, a file nor a context the daemon holds"
              spec))))))))

(defun rlm-babel--async-p (params)
  "Return non-nil to run the block with PARAMS asynchronously."
  (let ((flag (rlm-babel--value params :async)))
    (cond ((member flag '("yes" "t")) t)
          ((member flag '("no" "nil")) nil)
          ((eq rlm-babel-async 'interactive)
           (not (or noninteractive
                    (bound-and-true-p org-export-current-backend))))
          (t rlm-babel-async))))

(defun rlm-babel--placeholder (job)
  "Return the placeholder result shown while JOB is running."
  (format "rlm: waiting for the answer (job %s)" (rlm-job-id job)))

(defun rlm-babel--replace-placeholder (job buffer location params)
  "Replace JOB's placeholder in BUFFER at LOCATION with its outcome.
PARAMS are the block's header arguments."
  (when (buffer-live-p buffer)
    (with-current-buffer buffer
      (save-excursion
        (save-restriction
          (widen)
          (goto-char location)
          (let* ((info (org-babel-get-src-block-info))
                 (result-pos (and info (org-babel-where-is-src-block-result nil info)))
                 (text (rlm-babel--outcome job)))
            (if (not (and result-pos
                          (save-excursion
                            (goto-char result-pos)
                            (search-forward (rlm-job-id job)
                                            (save-excursion (forward-line 1)
                                                            (org-babel-result-end))
                                            t))))
                (message "rlm: the block's placeholder is gone; the answer is in %s"
                         (buffer-name (rlm-job-buffer job)))
              (let ((group (prepare-change-group)))
                (activate-change-group group)
                (unwind-protect
                    (org-babel-insert-result text (cdr (assq :result-params params))
                                             info nil "rlm")
                  ;; One undo step for the whole answer.
                  (undo-amalgamate-change-group group)
                  (accept-change-group group)))
              ;; Org says "Code block evaluation complete." when the
              ;; placeholder goes in; the real outcome comes now.
              (unless (eq (rlm-job-state job) 'done)
                (message "%s" text)))))))))

(defun rlm-babel--outcome (job)
  "Return the result text of JOB, ended: its answer, or what stopped it."
  (pcase (rlm-job-state job)
    ('done (rlm-job-answer job))
    ('cancelled (format "rlm: the block was cancelled%s"
                        (if (rlm-job-error job) (format " (%s)" (rlm-job-error job)) "")))
    (_ (format "rlm: the block failed: %s" (or (rlm-job-error job) "unknown error")))))

(defun org-babel-execute:rlm (body params)
  "Ask the question BODY of the daemon, with the header arguments PARAMS."
  (let* ((question (string-trim body))
         (context (progn (when (string-empty-p question)
                           (user-error "The rlm block is empty: write a question in it"))
                         (rlm-babel--context params)))
         (options (rlm-babel--options params)))
    (if (not (rlm-babel--async-p params))
        (rlm-query-sync question :context (car context) :description (cdr context)
                        :options options :timeout rlm-babel-timeout)
      (let* ((buffer (current-buffer))
             (location (copy-marker (or (bound-and-true-p org-babel-current-src-block-location)
                                        (org-babel-where-is-src-block-head)
                                        (point))))
             (job (rlm-start-query
                   question :context (car context) :description (cdr context)
                   :options options :display nil
                   :callback (lambda (job)
                               (rlm-babel--replace-placeholder job buffer location params)
                               (set-marker location nil)))))
        (rlm-babel--placeholder job)))))

(defun org-babel-prep-session:rlm (_session _params)
  "Signal that rlm blocks have no sessions."
  (user-error "Rlm blocks have no sessions; each block is a query"))

(add-to-list 'org-src-lang-modes '("rlm" . text))

(provide 'ob-rlm)
;;; ob-rlm.el ends here
